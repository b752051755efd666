//! The HTTP API (axum). Handlers are thin: parse → call the workflow/store → map to a response.
//! [`app`] builds the router from state; [`serve`] runs it on a listener until shutdown, so tests
//! drive exactly the router production runs.

mod admin;
pub mod auth;
mod correlation;
mod customers;
mod docs;
pub mod edge;
pub mod error;
mod events;
mod extract;
mod fulfilment;
mod health;
mod metrics;
pub mod openapi;
mod ops;
mod orders;
mod products;
mod reports;
mod schema;
pub mod stripe_webhooks;
mod webhooks;

use std::future::Future;
use std::sync::Arc;

use axum::Router;
use axum::extract::{DefaultBodyLimit, Request};
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Response};
use tokio::net::TcpListener;

pub use auth::{Authenticator, Principal, Secret};
pub use correlation::CorrelationId;
use error::ApiError;
use extract::BodyLimit;

use crate::store::Store;
use crate::workflow::checkout::CheckoutSettings;
use crate::workflow::steps::SagaSettings;

/// Default largest request body: 64 KiB.
pub const DEFAULT_BODY_LIMIT: usize = 64 * 1024;

/// Everything handlers share. Cheap to clone: every field is an `Arc`.
#[derive(Clone)]
pub struct AppState {
    /// The database: catalog, customers, orders, jobs.
    pub store: Arc<dyn Store>,
    /// Verifies bearer tokens.
    pub auth: Arc<Authenticator>,
    /// Currency and step settings for new orders.
    pub checkout: Arc<CheckoutSettings>,
    /// Attempts of the compensation jobs a cancellation enqueues.
    pub saga: Arc<SagaSettings>,
    /// Largest accepted request body in bytes.
    pub body_limit: usize,
    /// Rate limits, overload bounds, CORS, caching and security headers.
    pub edge: Arc<edge::Edge>,
    /// Metrics registry, alarm thresholds, and who may scrape `/metrics`.
    pub monitoring: crate::monitoring::Monitoring,
    /// Events out: the CloudEvent source the feed renders with, webhook settings.
    pub events: Arc<crate::events::EventSettings>,
    /// The signing secrets `POST /webhooks/stripe` verifies Stripe's events with.
    pub stripe_webhooks: Arc<stripe_webhooks::StripeWebhookSettings>,
}

/// The whole API as a router.
pub fn app(state: AppState) -> Router {
    let body_limit = state.body_limit;
    let routes = Router::new()
        // Every resource module's routes, registered with their OpenAPI operations, plus
        // /openapi.json and /docs.
        .merge(openapi::routes(state.checkout.currency))
        .route_layer(middleware::from_fn(correlation::record_route))
        .route_layer(middleware::from_fn(metrics::tag_route))
        .fallback(|| async { ApiError::not_found("route") })
        .method_not_allowed_fallback(|| async { ApiError::method_not_allowed() })
        .layer(DefaultBodyLimit::max(body_limit))
        .layer(middleware::from_fn(
            move |mut request: Request, next: Next| async move {
                request.extensions_mut().insert(BodyLimit(body_limit));
                next.run(request).await
            },
        ));
    let counted = state.monitoring.metrics.clone();
    edge::wrap(routes, state.edge.clone(), state.auth.clone())
        .layer(middleware::from_fn(move |request: Request, next: Next| {
            metrics::count(counted.clone(), request, next)
        }))
        .layer(middleware::from_fn(correlation::middleware))
        .with_state(state)
}

/// Serves `app` on `listener` until `shutdown` resolves, then lets in-flight requests finish.
/// See [`edge::server`] for why this is not `axum::serve`.
pub async fn serve(
    listener: TcpListener,
    state: AppState,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> std::io::Result<()> {
    let header_timeout = state.edge.settings.header_timeout;
    edge::server::serve(listener, app(state), header_timeout, shutdown).await
}

/// Serves only `GET /metrics` on `listener` (`--metrics-listen`), with the same access rule as the
/// API's, until `shutdown` resolves.
pub async fn serve_metrics(
    listener: TcpListener,
    state: AppState,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> std::io::Result<()> {
    // The same documented operation as the API's, registered the same way.
    let (router, _) = metrics::routes().split_for_parts();
    let router = router
        .fallback(|| async { ApiError::not_found("route") })
        .with_state(state);
    axum::serve(listener, router).with_graceful_shutdown(shutdown).await
}

/// Personal responses must never be cached by a shared cache.
fn private(response: impl IntoResponse) -> Response {
    let mut response = response.into_response();
    response.headers_mut().insert(
        axum::http::header::CACHE_CONTROL,
        axum::http::HeaderValue::from_static("private, no-store"),
    );
    response
}
