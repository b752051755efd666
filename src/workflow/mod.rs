//! The checkout saga: what happens to an order, step by step.
//!
//! Placing an order is the synchronous commitment ([`checkout::place_order`]). Everything after it
//! runs as durable jobs whose kinds are named here; the first one (`charge_payment`) is written in
//! the same transaction as the order.

pub mod checkout;

/// Job kind of the first step after checkout: take the payment.
pub const CHARGE_PAYMENT: &str = "charge_payment";
