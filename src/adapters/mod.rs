//! The outside world behind small traits: payment providers, notifiers and event sinks. The workflow layer
//! depends on the traits only; `cli` chooses the implementations from configuration.

pub mod events;
pub mod notify;
pub mod payment;
