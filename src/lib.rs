//! orderflow: an order-processing and checkout engine.
//!
//! Layers, dependencies pointing down only (see `docs/architecture.md`):
//! `domain` (pure rules) ← `store` (persistence, all SQL) ← `workflow` (checkout steps) ←
//! `http` (axum API) ← `cli` (config, wiring). `events` is the relay that takes committed events
//! to NATS and webhooks (beside `queue`). `telemetry` and `seed` are leaves used by `cli`.

pub mod adapters;
pub mod cli;
pub mod clock;
pub mod config;
pub mod domain;
pub mod events;
pub mod http;
pub mod monitoring;
pub mod queue;
pub mod seed;
pub mod store;
pub mod telemetry;
pub mod workflow;
