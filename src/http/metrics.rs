//! `GET /metrics` (Prometheus text format) and the middleware that counts every request by route
//! template and status.

use std::time::Instant;

use axum::extract::{MatchedPath, Request, State};
use axum::http::{HeaderMap, header};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use utoipa_axum::router::OpenApiRouter;
use utoipa_axum::routes;

use super::AppState;
use super::error::ApiError;
use crate::monitoring::MetricsAccess;
use crate::monitoring::metrics::{CONTENT_TYPE, Metrics};

pub fn routes() -> OpenApiRouter<AppState> {
    OpenApiRouter::default().routes(routes!(scrape))
}

/// The route template that answered, carried on the response to [`count`].
#[derive(Clone, Debug)]
struct Route(String);

/// Route layer: notes which route template answered.
pub async fn tag_route(request: Request, next: Next) -> Response {
    let route = request
        .extensions()
        .get::<MatchedPath>()
        .map(|m| m.as_str().to_string());
    let mut response = next.run(request).await;
    if let Some(route) = route {
        response.extensions_mut().insert(Route(route));
    }
    response
}

/// Outermost layer: counts and times every request, including those the edge answers itself
/// (rate limited, shed, timed out). Requests no route matched are counted as `unmatched`.
pub async fn count(metrics: Metrics, request: Request, next: Next) -> Response {
    let started = Instant::now();
    let method = request.method().clone();
    let response = next.run(request).await;
    let route = response
        .extensions()
        .get::<Route>()
        .map(|r| r.0.as_str())
        .unwrap_or("unmatched");
    metrics.http_request(method.as_str(), route, response.status().as_u16(), started.elapsed());
    response
}

/// Metrics
///
/// Prometheus text exposition (version 0.0.4): this process's request, order, step and payment
/// counters and latency histograms, and the database's queue depths, oldest ready job ages,
/// stuck orders, connection pools and alarm states. Public unless the server is started with
/// `--metrics-access admin` or `--metrics-token`; then an admin token or the scrape token is
/// required.
#[utoipa::path(
    get,
    path = "/metrics",
    operation_id = "getMetrics",
    tag = "health",
    security((), ("bearer" = [])),
    responses(
        (status = 200, description = "The metrics.", content_type = "text/plain; version=0.0.4", body = String),
        (status = 403, description = "`forbidden`: the token lacks the admin role.", body = super::error::Problem,
            content_type = "application/problem+json"),
    ),
)]
async fn scrape(State(state): State<AppState>, headers: HeaderMap) -> Result<Response, ApiError> {
    authorize(&state, &headers).await?;
    let monitoring = &state.monitoring;
    let text = monitoring
        .metrics
        .render(state.store.as_ref(), monitoring.alarms.stuck_limits())
        .await?;
    let mut response = ([(header::CONTENT_TYPE, CONTENT_TYPE)], text).into_response();
    response
        .headers_mut()
        .insert(header::CACHE_CONTROL, header::HeaderValue::from_static("no-store"));
    Ok(response)
}

async fn authorize(state: &AppState, headers: &HeaderMap) -> Result<(), ApiError> {
    let MetricsAccess::Restricted { scrape_token } = state.monitoring.access.as_ref() else {
        return Ok(());
    };
    let token = headers
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer ").or_else(|| v.strip_prefix("bearer ")))
        .map(str::trim)
        .ok_or_else(|| ApiError::unauthorized("a bearer token is required"))?;
    if scrape_token
        .as_ref()
        .is_some_and(|expected| constant_time_eq(token.as_bytes(), expected.0.as_bytes()))
    {
        return Ok(());
    }
    let principal = state.auth.verify(token).await?;
    if principal.is_admin() {
        Ok(())
    } else {
        Err(ApiError::forbidden("reading metrics needs the admin role"))
    }
}

fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    a.len() == b.len() && a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}
