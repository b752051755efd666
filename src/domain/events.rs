//! Domain events: the business facts integrators hear about, and their CloudEvents 1.0 form.
//!
//! An event is decided by the workflow (which fact happened), written by the store in the same
//! transaction as the fact (with the order as it stands after it), positioned by the relay once
//! committed, and rendered here — one function — for every channel (feed, NATS, webhooks), so an
//! event looks byte-for-byte the same wherever it is read.

use std::fmt;
use std::str::FromStr;

use chrono::{DateTime, SecondsFormat, Utc};
use serde::Serialize;
use serde_json::{Map, Value, json};
use uuid::Uuid;

use super::order::Order;

/// What happened. Names are the CloudEvent `type`s of the contract (API.md "Events out").
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum EventType {
    OrderPlaced,
    /// Payment authorized or captured: the order may be shipped.
    OrderPaid,
    /// Stock committed: what a warehouse listens for.
    OrderReadyToShip,
    OrderShipped,
    OrderFulfilled,
    /// `data.reason` says why.
    OrderCancelled,
    PaymentCaptured,
    PaymentRefunded,
    WebhookEndpointDisabled,
}

impl EventType {
    pub const ALL: [EventType; 9] = [
        EventType::OrderPlaced,
        EventType::OrderPaid,
        EventType::OrderReadyToShip,
        EventType::OrderShipped,
        EventType::OrderFulfilled,
        EventType::OrderCancelled,
        EventType::PaymentCaptured,
        EventType::PaymentRefunded,
        EventType::WebhookEndpointDisabled,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            EventType::OrderPlaced => "order.placed",
            EventType::OrderPaid => "order.paid",
            EventType::OrderReadyToShip => "order.ready_to_ship",
            EventType::OrderShipped => "order.shipped",
            EventType::OrderFulfilled => "order.fulfilled",
            EventType::OrderCancelled => "order.cancelled",
            EventType::PaymentCaptured => "payment.captured",
            EventType::PaymentRefunded => "payment.refunded",
            EventType::WebhookEndpointDisabled => "webhook_endpoint.disabled",
        }
    }
}

impl fmt::Display for EventType {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl FromStr for EventType {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        EventType::ALL
            .into_iter()
            .find(|t| t.as_str() == s)
            .ok_or_else(|| format!("unknown event type `{s}`"))
    }
}

/// A filter on event types as endpoints and the feed take it: `*`, a prefix `order.*`, or a type.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct TypePattern(String);

impl TypePattern {
    pub const MAX_LEN: usize = 64;

    pub fn parse(value: &str) -> Result<Self, String> {
        if value == "*" {
            return Ok(TypePattern(value.into()));
        }
        if let Some(prefix) = value.strip_suffix(".*") {
            if EventType::ALL
                .iter()
                .any(|t| t.as_str().split('.').next() == Some(prefix))
            {
                return Ok(TypePattern(value.into()));
            }
            return Err(format!(
                "`{value}` matches no event type; prefixes are {}",
                prefixes().join(", ")
            ));
        }
        value
            .parse::<EventType>()
            .map(|_| TypePattern(value.into()))
            .map_err(|_| format!("`{value}` is not an event type, `<prefix>.*` or `*`"))
    }

    pub fn matches(&self, event_type: &str) -> bool {
        match self.0.strip_suffix('*') {
            Some("") => true,
            Some(prefix) => event_type.starts_with(prefix),
            None => self.0 == event_type,
        }
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }

    /// True when any of `patterns` matches.
    pub fn any_matches(patterns: &[TypePattern], event_type: &str) -> bool {
        patterns.iter().any(|p| p.matches(event_type))
    }
}

fn prefixes() -> Vec<String> {
    let mut prefixes: Vec<String> = EventType::ALL
        .iter()
        .map(|t| format!("{}.*", t.as_str().split('.').next().unwrap_or_default()))
        .collect();
    prefixes.dedup();
    prefixes
}

/// Why an order was cancelled (`data.reason` of `order.cancelled`).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum CancelReason {
    PaymentDeclined,
    CustomerRequest,
    OperatorRequest,
    ReservationExpired,
}

impl CancelReason {
    pub fn as_str(self) -> &'static str {
        match self {
            CancelReason::PaymentDeclined => "payment_declined",
            CancelReason::CustomerRequest => "customer_request",
            CancelReason::OperatorRequest => "operator_request",
            CancelReason::ReservationExpired => "reservation_expired",
        }
    }

    /// The words the order's timeline records.
    pub fn description(self) -> &'static str {
        match self {
            CancelReason::PaymentDeclined => "payment declined",
            CancelReason::CustomerRequest => "cancelled by the customer",
            CancelReason::OperatorRequest => "cancelled by an operator",
            CancelReason::ReservationExpired => "reservation expired before payment",
        }
    }
}

/// An event a business change emits: its type and the facts it adds to `data` beside the order.
#[derive(Clone, Debug, PartialEq)]
pub struct NewEvent {
    pub event_type: EventType,
    /// Merged into `data` (e.g. `reason`, `refund`).
    pub extra: Map<String, Value>,
}

impl NewEvent {
    pub fn new(event_type: EventType) -> Self {
        Self {
            event_type,
            extra: Map::new(),
        }
    }

    pub fn with(mut self, key: &str, value: impl Into<Value>) -> Self {
        self.extra.insert(key.to_string(), value.into());
        self
    }

    pub fn cancelled(reason: CancelReason, detail: Option<&str>) -> Self {
        let event = NewEvent::new(EventType::OrderCancelled).with("reason", reason.as_str());
        match detail {
            Some(detail) => event.with("detail", detail),
            None => event,
        }
    }
}

/// The payment as an event shows it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PaymentFacts {
    pub state: String,
    pub provider: String,
    pub authorized_minor: i64,
    pub captured_minor: i64,
    pub refunded_minor: i64,
}

/// The order part of `data`: the order as `GET /orders/{id}` shows it, without its timeline and
/// the pipeline's progress (those change after the fact; an event records the fact).
pub fn order_data(order: &Order, payment: Option<&PaymentFacts>, event: &NewEvent) -> Value {
    let currency = order.currency;
    let items: Vec<Value> = order
        .lines
        .iter()
        .map(|line| {
            json!({
                "product_id": line.product_id,
                "quantity": line.quantity,
                "unit_price": line.unit_price.to_json_number(currency),
                "line_total": line.unit_price.checked_mul(line.quantity.get())
                    .expect("bounded by field limits").to_json_number(currency),
            })
        })
        .collect();
    let mut view = json!({
        "order_id": order.id,
        "customer_id": order.customer_id,
        "status": order.status,
        "items": items,
        "total_amount": order.total.to_json_number(currency),
        "currency": currency,
        "created_at": order.created_at,
        "updated_at": order.updated_at,
    });
    if let Some(correlation_id) = &order.correlation_id {
        view["correlation_id"] = json!(correlation_id);
    }
    if let Some(region) = &order.region {
        view["region"] = json!(region);
    }
    if let Some(shipping) = &order.shipping {
        view["shipping"] = json!(shipping);
    }
    if let Some(payment) = payment {
        let amount = |minor: i64| {
            super::Money::from_minor(minor)
                .unwrap_or_default()
                .to_json_number(currency)
        };
        view["payment"] = json!({
            "state": payment.state,
            "provider": payment.provider,
            "authorized_amount": amount(payment.authorized_minor),
            "captured_amount": amount(payment.captured_minor),
            "refunded_amount": amount(payment.refunded_minor),
        });
    }
    let mut data = Map::new();
    data.insert("order".into(), view);
    data.extend(event.extra.clone());
    Value::Object(data)
}

/// The subject of an order's events.
pub fn order_subject(order: impl fmt::Display) -> String {
    format!("orders/{order}")
}

/// A committed, positioned event as the store gives it back.
#[derive(Clone, Debug, PartialEq)]
pub struct StoredEvent {
    pub id: Uuid,
    pub subject: String,
    pub order_id: Option<Uuid>,
    pub event_type: String,
    pub sequence: i64,
    pub position: i64,
    pub time: DateTime<Utc>,
    pub data: Value,
    pub correlation_id: Option<String>,
}

/// The structured-mode CloudEvent JSON (CloudEvents 1.0).
#[derive(Serialize)]
pub struct CloudEvent<'a> {
    pub specversion: &'static str,
    pub id: Uuid,
    pub source: &'a str,
    #[serde(rename = "type")]
    pub event_type: &'a str,
    pub subject: &'a str,
    pub time: String,
    pub datacontenttype: &'static str,
    pub sequence: i64,
    pub position: i64,
    /// Extension attribute: the request that started the order's story.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub correlationid: Option<&'a str>,
    /// Extension attribute: the `--region` of the process that accepted the order (its
    /// `data.order.region`), so consumers can route or filter by region without opening `data`.
    /// Taken from the stored event, not from the process sending it, so every channel and every
    /// re-send carries the same bytes. Absent for orders without a region and non-order events.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub region: Option<&'a str>,
    pub data: &'a Value,
}

impl StoredEvent {
    pub fn cloud_event<'a>(&'a self, source: &'a str) -> CloudEvent<'a> {
        CloudEvent {
            specversion: "1.0",
            id: self.id,
            source,
            event_type: &self.event_type,
            subject: &self.subject,
            time: self.time.to_rfc3339_opts(SecondsFormat::Micros, true),
            datacontenttype: "application/json",
            sequence: self.sequence,
            position: self.position,
            correlationid: self.correlation_id.as_deref(),
            region: self.data.pointer("/order/region").and_then(Value::as_str),
            data: &self.data,
        }
    }

    /// The CloudEvent as bytes, as every channel sends it.
    pub fn to_json(&self, source: &str) -> Vec<u8> {
        serde_json::to_vec(&self.cloud_event(source)).expect("an event always serializes")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn patterns_match_types_and_prefixes() {
        let all = TypePattern::parse("*").unwrap();
        let orders = TypePattern::parse("order.*").unwrap();
        let paid = TypePattern::parse("order.paid").unwrap();
        assert!(all.matches("payment.refunded"));
        assert!(orders.matches("order.cancelled") && !orders.matches("payment.captured"));
        assert!(paid.matches("order.paid") && !paid.matches("order.placed"));
        assert!(TypePattern::parse("order.nope").is_err());
        assert!(TypePattern::parse("nope.*").is_err());
        assert!(TypePattern::parse("webhook_endpoint.*").is_ok());
    }

    #[test]
    fn types_round_trip() {
        for t in EventType::ALL {
            assert_eq!(t.as_str().parse::<EventType>(), Ok(t));
        }
    }
}
