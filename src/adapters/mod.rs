//! The outside world behind small traits: payment providers and notifiers. The workflow layer
//! depends on the traits only; `cli` chooses the implementations from configuration.

pub mod notify;
pub mod payment;
