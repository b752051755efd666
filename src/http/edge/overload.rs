//! Overload protection: past a bound, answer 503 with `Retry-After` at once rather than queue.
//! A queue in front of a saturated database only turns a short spike into a long outage of
//! timeouts; a quick 503 lets clients (and load balancers) back off and try again.

use std::sync::Arc;
use std::time::Duration;

use axum::extract::{Request, State};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};

use super::Edge;
use super::rate_limit::RouteClass;
use crate::http::error::ApiError;
use crate::http::extract::BodyTimeout;

/// Holds a permit for the life of each request; with none left, 503 at once. Health probes pass
/// without one so an orchestrator does not kill a busy but healthy process.
pub async fn bound_in_flight(State(edge): State<Arc<Edge>>, request: Request, next: Next) -> Response {
    if RouteClass::of(request.method(), request.uri().path()).is_none() {
        return next.run(request).await;
    }
    match edge.in_flight.clone().try_acquire_owned() {
        Ok(_permit) => next.run(request).await,
        Err(_) => {
            tracing::warn!(
                limit = edge.settings.max_in_flight,
                "shedding a request: too many in flight"
            );
            ApiError::overloaded(format!(
                "more than {} requests are in progress; retry shortly",
                edge.settings.max_in_flight
            ))
            .into_response()
        }
    }
}

/// Ends a handler that runs too long with 503. A long-poll (`Prefer: wait=N`) gets its wait on
/// top. Work that must not be cut off halfway (placing an order) runs in its own task, so a
/// timeout here abandons only the answer; a retry with the same `Idempotency-Key` gets it.
pub async fn handler_timeout(State(edge): State<Arc<Edge>>, request: Request, next: Next) -> Response {
    let limit = edge.settings.handler_timeout + requested_wait(&request);
    match tokio::time::timeout(limit, next.run(request)).await {
        Ok(response) => response,
        Err(_) => {
            tracing::warn!(limit_ms = limit.as_millis() as u64, "handler timed out");
            ApiError::timed_out(limit).into_response()
        }
    }
}

/// The wait a `Prefer: wait=N` long-poll asks for (at most the API's 30 s cap).
fn requested_wait(request: &Request) -> Duration {
    let seconds = request
        .headers()
        .get_all("prefer")
        .iter()
        .filter_map(|value| value.to_str().ok())
        .flat_map(|value| value.split([',', ';']))
        .filter_map(|preference| preference.trim().strip_prefix("wait="))
        .filter_map(|n| n.trim().parse::<u64>().ok())
        .next()
        .unwrap_or(0);
    Duration::from_secs(seconds.min(30))
}

/// Tells the JSON extractor how long the client may take to send its body (see
/// [`BodyTimeout`]); a slow sender then gets 408 instead of holding a permit for long.
pub async fn body_timeout(State(limit): State<Duration>, mut request: Request, next: Next) -> Response {
    request.extensions_mut().insert(BodyTimeout(limit));
    next.run(request).await
}
