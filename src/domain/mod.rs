//! Pure business types and rules: no I/O, no clocks read behind your back, no database.
//!
//! Everything a request carries is parsed here into a type that cannot hold an invalid value
//! (`Money`, `Quantity`, `Email`, …), so the store and workflow layers never re-check input.
//! The order state machine lists every legal transition in one place (`order::OrderStatus`).

pub mod customer;
pub mod events;
pub mod fulfilment;
pub mod ids;
pub mod money;
pub mod order;
pub mod product;
pub mod report;
pub mod shipping;
pub mod validation;

pub use customer::{Customer, Email, NewCustomer};
pub use ids::{CustomerId, OrderId, ProductId};
pub use money::{Currency, Money};
pub use order::{
    Cart, CartLine, CartRejection, Order, OrderEvent, OrderLine, OrderStatus, PaymentToken, Quantity, Shortage,
    StockLevel,
};
pub use product::{NewProduct, Product, ProductPatch, StockAdjustment};
pub use shipping::{CountryCode, ShippingAddress};
pub use validation::{FieldError, FieldErrors};
