//! Turning a validated checkout request into the one atomic commitment: reserve stock, create
//! the order `pending_payment`, record the idempotency key, enqueue the payment step, append the
//! event — a single store call.

use std::sync::Arc;

use serde_json::json;
use sha2::{Digest, Sha256};

use super::CHARGE_PAYMENT;
use crate::domain::{Cart, Currency, CustomerId, OrderId, PaymentToken, ShippingAddress};
use crate::store::{NewJob, PlaceOrder, PlaceOrderOutcome, Store, StoreError, StoreResult};

/// Settings of the checkout commitment.
#[derive(Clone, Debug)]
pub struct CheckoutSettings {
    /// The store currency; every price and order is in it.
    pub currency: Currency,
    /// Attempts the payment step gets before it is dead-lettered.
    pub payment_max_attempts: u32,
    /// This process's `--region`, recorded on every order it accepts.
    pub region: Option<String>,
}

impl Default for CheckoutSettings {
    fn default() -> Self {
        Self {
            currency: Currency::USD,
            payment_max_attempts: 3,
            region: None,
        }
    }
}

/// A checkout request after parsing and authorization.
#[derive(Clone, Debug)]
pub struct CheckoutRequest {
    pub principal: String,
    pub idempotency_key: String,
    pub customer_id: CustomerId,
    pub cart: Cart,
    pub payment_token: PaymentToken,
    /// Where to ship the order, when the client gave an address.
    pub shipping: Option<ShippingAddress>,
    pub correlation_id: Option<String>,
}

impl CheckoutRequest {
    /// A digest of everything that determines the order. The same key with a different digest is
    /// a client bug (key reuse) and is refused rather than replayed.
    ///
    /// The address is part of it only when given, so a request without one hashes as it did
    /// before addresses existed (a retry across the upgrade still replays).
    pub fn fingerprint(&self) -> String {
        let mut normalized = json!({
            "customer_id": self.customer_id,
            "items": self.cart.lines(),
            "payment_token": self.payment_token,
        });
        if let Some(shipping) = &self.shipping {
            normalized["shipping"] = json!(shipping);
        }
        let digest = Sha256::digest(normalized.to_string().as_bytes());
        digest.iter().map(|byte| format!("{byte:02x}")).collect()
    }
}

/// Places the order: one store call, one transaction.
///
/// The commitment runs in its own task, so a client that disconnects mid-request cannot cancel
/// it halfway: it completes (and its idempotency record with it) or fails as a whole, and the
/// client's retry with the same key then replays the outcome.
pub async fn place_order(
    store: Arc<dyn Store>,
    settings: &CheckoutSettings,
    request: CheckoutRequest,
) -> StoreResult<PlaceOrderOutcome> {
    let now = crate::clock::now();
    let order_id = OrderId::new();
    let place = PlaceOrder {
        fingerprint: request.fingerprint(),
        principal: request.principal,
        idempotency_key: request.idempotency_key,
        order_id,
        customer_id: request.customer_id,
        cart: request.cart,
        payment_token: request.payment_token,
        shipping: request.shipping,
        currency: settings.currency,
        correlation_id: request.correlation_id,
        region: settings.region.clone(),
        first_job: NewJob {
            kind: CHARGE_PAYMENT,
            payload: crate::telemetry::with_trace_context(json!({ "order_id": order_id })),
            run_at: now,
            max_attempts: settings.payment_max_attempts,
        },
        now,
    };
    // The checkout transaction's span: a child of the request's, so its logs and trace carry
    // the correlation id.
    let span = tracing::info_span!("store.place_order", order_id = %order_id, otel.kind = "client",
        db.operation.name = "place_order");
    tokio::spawn(tracing::Instrument::instrument(
        async move { store.place_order(&place).await },
        span,
    ))
    .await
    .map_err(|error| StoreError::Corrupt(format!("the checkout task failed: {error}")))?
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::domain::{CartLine, ProductId, Quantity};

    fn request(quantity: i64) -> CheckoutRequest {
        let product = "0190f3c4-0000-7000-8000-000000000001".parse::<ProductId>().unwrap();
        CheckoutRequest {
            principal: "p".into(),
            idempotency_key: "k".into(),
            customer_id: "0190f3c4-0000-7000-8000-000000000002".parse().unwrap(),
            cart: Cart::new(vec![CartLine {
                product_id: product,
                quantity: Quantity::parse(quantity).unwrap(),
            }])
            .unwrap(),
            payment_token: PaymentToken::default_sandbox(),
            shipping: None,
            correlation_id: Some("differs-per-retry".into()),
        }
    }

    #[test]
    fn fingerprint_covers_the_order_not_the_transport() {
        let mut retry = request(1);
        retry.correlation_id = Some("another".into());
        assert_eq!(request(1).fingerprint(), retry.fingerprint());
        assert_ne!(request(1).fingerprint(), request(2).fingerprint());
    }

    fn address(line1: &str) -> ShippingAddress {
        ShippingAddress {
            name: "Jane Doe".into(),
            line1: line1.into(),
            line2: None,
            city: "Springfield".into(),
            region: None,
            postal_code: "62701".into(),
            country: crate::domain::CountryCode::parse("US").unwrap(),
        }
    }

    #[test]
    fn fingerprint_covers_the_address_and_is_unchanged_without_one() {
        let plain = request(1);
        // The digest of a request without an address is the one stored before addresses
        // existed: keys recorded then still replay.
        let legacy = json!({
            "customer_id": plain.customer_id,
            "items": plain.cart.lines(),
            "payment_token": plain.payment_token,
        });
        let legacy: String = Sha256::digest(legacy.to_string().as_bytes())
            .iter()
            .map(|byte| format!("{byte:02x}"))
            .collect();
        assert_eq!(plain.fingerprint(), legacy);

        let mut shipped = request(1);
        shipped.shipping = Some(address("1 Main St"));
        let mut elsewhere = request(1);
        elsewhere.shipping = Some(address("2 Main St"));
        assert_ne!(shipped.fingerprint(), plain.fingerprint());
        assert_ne!(shipped.fingerprint(), elsewhere.fingerprint());
        let mut again = request(1);
        again.shipping = Some(address("1 Main St"));
        assert_eq!(shipped.fingerprint(), again.fingerprint());
    }
}
