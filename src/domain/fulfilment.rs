//! After the payment: shipments the warehouse reports back (external fulfilment, possibly in
//! parts) and refunds after delivery (in parts, optionally with returned units restocked).
//!
//! The rules that need no database live here: which quantities may still ship or come back
//! ([`remaining`]), and what may be written in a carrier or tracking field. The store applies
//! them again under the order's row lock, so two concurrent requests cannot both take the last
//! unit or the last cent.

use std::collections::BTreeMap;

use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};
use uuid::Uuid;

use super::validation;
use super::{OrderLine, ProductId};

/// Longest `carrier` (e.g. `DHL Express`).
pub const CARRIER_MAX: usize = 100;
/// Longest `tracking_number`.
pub const TRACKING_NUMBER_MAX: usize = 100;
/// Longest `tracking_url`.
pub const TRACKING_URL_MAX: usize = 2048;

/// A carrier name: one trimmed line.
pub fn parse_carrier(value: &str) -> Result<String, String> {
    validation::single_line(value, CARRIER_MAX)
}

/// A tracking number: one trimmed line.
pub fn parse_tracking_number(value: &str) -> Result<String, String> {
    validation::single_line(value, TRACKING_NUMBER_MAX)
}

/// An absolute `https://` or `http://` URL a customer can open.
pub fn parse_tracking_url(value: &str) -> Result<String, String> {
    let url = validation::single_line(value, TRACKING_URL_MAX)?;
    let rest = url
        .strip_prefix("https://")
        .or_else(|| url.strip_prefix("http://"))
        .ok_or_else(|| "must be an absolute http(s) URL".to_string())?;
    let host = rest.split(['/', '?', '#']).next().unwrap_or_default();
    if host.is_empty() || url.contains(char::is_whitespace) {
        return Err("must be an absolute http(s) URL with a host and no spaces".into());
    }
    Ok(url)
}

/// Units of one product (in a shipment, or restocked with a refund).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ItemQuantity {
    pub product_id: ProductId,
    pub quantity: u32,
}

/// A shipment as recorded.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Shipment {
    pub id: Uuid,
    pub carrier: String,
    pub tracking_number: String,
    pub tracking_url: Option<String>,
    pub items: Vec<ItemQuantity>,
    pub created_at: DateTime<Utc>,
}

/// Why money goes back (the API's `reason`).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(rename_all = "snake_case")]
pub enum RefundReason {
    RequestedByCustomer,
    Returned,
    Damaged,
    Other,
}

impl RefundReason {
    pub const ALL: [RefundReason; 4] = [
        RefundReason::RequestedByCustomer,
        RefundReason::Returned,
        RefundReason::Damaged,
        RefundReason::Other,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            RefundReason::RequestedByCustomer => "requested_by_customer",
            RefundReason::Returned => "returned",
            RefundReason::Damaged => "damaged",
            RefundReason::Other => "other",
        }
    }

    pub fn parse(value: &str) -> Result<Self, String> {
        RefundReason::ALL
            .into_iter()
            .find(|reason| reason.as_str() == value)
            .ok_or_else(|| "must be one of requested_by_customer, returned, damaged, other".to_string())
    }
}

/// Where a refund stands.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum RefundState {
    /// Accepted; the refund step has not settled it with the provider yet.
    Pending,
    /// The provider refunded it.
    Succeeded,
}

impl RefundState {
    pub fn as_str(self) -> &'static str {
        match self {
            RefundState::Pending => "pending",
            RefundState::Succeeded => "succeeded",
        }
    }

    pub fn parse(value: &str) -> Result<Self, String> {
        match value {
            "pending" => Ok(RefundState::Pending),
            "succeeded" => Ok(RefundState::Succeeded),
            other => Err(format!("unknown refund state `{other}`")),
        }
    }
}

/// A refund as recorded.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Refund {
    pub id: Uuid,
    pub amount_minor: i64,
    pub reason: RefundReason,
    pub state: RefundState,
    /// The provider's refund id, once settled.
    pub provider_ref: Option<String>,
    /// Units returned to stock with this refund.
    pub restock: Vec<ItemQuantity>,
    pub created_at: DateTime<Utc>,
    pub updated_at: DateTime<Utc>,
}

/// Per product: the `ordered` quantity minus what `taken` already accounts for (shipped units,
/// or restocked ones), in product order; ordered products only.
pub fn remaining(
    ordered: impl IntoIterator<Item = ItemQuantity>,
    taken: impl IntoIterator<Item = ItemQuantity>,
) -> BTreeMap<ProductId, u32> {
    let mut left: BTreeMap<ProductId, u32> = ordered.into_iter().map(|i| (i.product_id, i.quantity)).collect();
    for item in taken {
        if let Some(units) = left.get_mut(&item.product_id) {
            *units = units.saturating_sub(item.quantity);
        }
    }
    left
}

/// An order's lines as quantities per product.
pub fn ordered(lines: &[OrderLine]) -> impl Iterator<Item = ItemQuantity> + '_ {
    lines.iter().map(|line| ItemQuantity {
        product_id: line.product_id,
        quantity: line.quantity.get(),
    })
}

/// The requested items that exceed what is left: (product, requested, left). Products not on
/// the order have 0 left.
pub fn excess(requested: &[ItemQuantity], left: &BTreeMap<ProductId, u32>) -> Vec<(ProductId, u32, u32)> {
    requested
        .iter()
        .filter_map(|item| {
            let available = left.get(&item.product_id).copied().unwrap_or(0);
            (item.quantity > available).then_some((item.product_id, item.quantity, available))
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::domain::{Money, Quantity};

    fn line(product: ProductId, quantity: i64) -> OrderLine {
        OrderLine {
            product_id: product,
            quantity: Quantity::parse(quantity).unwrap(),
            unit_price: Money::from_minor(100).unwrap(),
        }
    }

    #[test]
    fn what_is_left_to_ship() {
        let (a, b, stranger) = (ProductId::new(), ProductId::new(), ProductId::new());
        let lines = [line(a, 3), line(b, 1)];
        let shipped = [ItemQuantity {
            product_id: a,
            quantity: 2,
        }];
        let left = remaining(ordered(&lines), shipped);
        assert_eq!(left[&a], 1);
        assert_eq!(left[&b], 1);
        let asked = [
            ItemQuantity {
                product_id: a,
                quantity: 2,
            },
            ItemQuantity {
                product_id: b,
                quantity: 1,
            },
            ItemQuantity {
                product_id: stranger,
                quantity: 1,
            },
        ];
        assert_eq!(excess(&asked, &left), vec![(a, 2, 1), (stranger, 1, 0)]);
    }

    #[test]
    fn tracking_fields() {
        assert_eq!(parse_carrier("  DHL ").unwrap(), "DHL");
        assert!(parse_carrier("").is_err());
        assert!(parse_tracking_number(&"9".repeat(TRACKING_NUMBER_MAX + 1)).is_err());
        assert!(parse_tracking_url("https://track.example/123").is_ok());
        assert!(parse_tracking_url("ftp://x").is_err());
        assert!(parse_tracking_url("https:///path").is_err());
        assert!(parse_tracking_url("javascript:alert(1)").is_err());
        assert_eq!(RefundReason::parse("damaged").unwrap(), RefundReason::Damaged);
        assert!(RefundReason::parse("fraud").is_err());
    }
}
