//! Catalog products and stock. `on_hand` is what the warehouse holds; `reserved` is promised to
//! accepted orders not yet shipped; what a buyer can still order is `on_hand - reserved`.
//! Invariant I1: `0 <= reserved <= on_hand`, enforced here for adjustments and by the store's
//! conditional updates (and table CHECKs) for reservations.

use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};

use super::ids::ProductId;
use super::money::Money;
use super::validation;

/// Field limits, declared once and used by validation and the API docs.
pub const NAME_MAX: usize = 200;
pub const DESCRIPTION_MAX: usize = 4000;
pub const CATEGORY_MAX: usize = 100;
pub const SKU_MAX: usize = 64;
pub const REASON_MAX: usize = 500;
/// Largest stock level or single adjustment a product may have.
pub const STOCK_MAX: i64 = 1_000_000_000;

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Product {
    pub id: ProductId,
    pub sku: Option<String>,
    pub name: String,
    pub description: Option<String>,
    pub category: Option<String>,
    pub price: Money,
    pub on_hand: i64,
    pub reserved: i64,
    /// Bumped on every change; the basis of the catalog's ETags.
    pub version: i64,
    pub created_at: DateTime<Utc>,
    pub updated_at: DateTime<Utc>,
}

impl Product {
    /// Units a new order may still reserve.
    pub fn available(&self) -> i64 {
        self.on_hand - self.reserved
    }
}

/// A product to create, already validated.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct NewProduct {
    pub id: ProductId,
    pub sku: Option<String>,
    pub name: String,
    pub description: Option<String>,
    pub category: Option<String>,
    pub price: Money,
    /// Initial stock; written to the inventory ledger as the `initial` movement.
    pub stock: i64,
}

/// Changes to a product's descriptive fields (stock changes go through [`StockAdjustment`]).
/// `Some(None)` clears an optional field.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct ProductPatch {
    pub name: Option<String>,
    pub description: Option<Option<String>>,
    pub category: Option<Option<String>>,
    pub price: Option<Money>,
}

impl ProductPatch {
    pub fn is_empty(&self) -> bool {
        self.name.is_none() && self.description.is_none() && self.category.is_none() && self.price.is_none()
    }
}

/// A restock (positive) or correction (negative) of on-hand stock, with the reason recorded in
/// the inventory ledger.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct StockAdjustment {
    pub delta: i64,
    pub reason: String,
}

pub fn parse_name(value: &str) -> Result<String, String> {
    validation::text(value, NAME_MAX)
}

pub fn parse_description(value: &str) -> Result<String, String> {
    validation::optional_text(value, DESCRIPTION_MAX)
}

pub fn parse_category(value: &str) -> Result<String, String> {
    validation::text(value, CATEGORY_MAX)
}

/// [`parse_sku`]'s rule as the regular expression the API schema publishes.
pub const SKU_PATTERN: &str = r"^[^\s\u0000-\u001F\u007F-\u009F]+$";

/// A stock-keeping unit: 1 to [`SKU_MAX`] characters, no white space anywhere (not even around
/// it: a SKU is an identifier, so nothing is trimmed) and no control characters.
pub fn parse_sku(value: &str) -> Result<String, String> {
    if value.chars().any(char::is_whitespace) {
        return Err("must not contain spaces".into());
    }
    validation::text(value, SKU_MAX)
}

pub fn parse_stock(value: i64) -> Result<i64, String> {
    if !(0..=STOCK_MAX).contains(&value) {
        return Err(format!("must be between 0 and {STOCK_MAX}"));
    }
    Ok(value)
}

pub fn parse_delta(value: i64) -> Result<i64, String> {
    // A range test, not `abs()`: `i64::MIN.abs()` overflows.
    if value == 0 || !(-STOCK_MAX..=STOCK_MAX).contains(&value) {
        return Err(format!(
            "must be a non-zero whole number between -{STOCK_MAX} and {STOCK_MAX}"
        ));
    }
    Ok(value)
}

pub fn parse_reason(value: &str) -> Result<String, String> {
    validation::text(value, REASON_MAX)
}

impl StockAdjustment {
    /// Whether applying this adjustment keeps I1 (`0 <= reserved <= on_hand`).
    pub fn allowed_for(&self, on_hand: i64, reserved: i64) -> bool {
        on_hand
            .checked_add(self.delta)
            .is_some_and(|next| next >= reserved && next >= 0 && next <= STOCK_MAX)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn adjustment_never_goes_below_reserved() {
        let take = |delta| StockAdjustment {
            delta,
            reason: "count".into(),
        };
        assert!(take(-5).allowed_for(10, 5));
        assert!(!take(-6).allowed_for(10, 5));
        assert!(take(7).allowed_for(0, 0));
        assert!(!take(1).allowed_for(STOCK_MAX, 0));
    }

    #[test]
    fn sku_and_stock_limits() {
        assert!(parse_sku("ABC-1").is_ok());
        assert!(parse_sku("has space").is_err());
        assert!(parse_sku(" ABC-1").is_err());
        assert!(parse_stock(-1).is_err());
        assert!(parse_delta(0).is_err());
        assert!(parse_delta(i64::MIN).is_err());
        assert!(parse_delta(-STOCK_MAX).is_ok());
    }
}
