//! Correlation ids: every request gets one — the caller's, when it sent a valid
//! `X-Correlation-Id`; else the trace id of a valid W3C `traceparent`; else a new UUID — echoed
//! on the response, recorded with the order, its events and jobs, and carried by the request's
//! span, so every log line of the request (and of the steps its jobs run) has it.
//!
//! The request span is also the request's OpenTelemetry server span when tracing is on: it
//! continues the caller's `traceparent`, is named after the route template once routing found
//! one (`GET /orders/{order_id}`), and records the response status.

use axum::extract::{MatchedPath, Request};
use axum::http::HeaderValue;
use axum::middleware::Next;
use axum::response::Response;
use tracing::field::Empty;
use uuid::Uuid;

use crate::telemetry;

pub const HEADER: &str = "x-correlation-id";
const TRACEPARENT: &str = "traceparent";
/// Longest correlation id taken from a caller.
pub const MAX_LEN: usize = 128;
/// [`is_valid`]'s rule as the regular expression the API schema publishes.
pub const PATTERN: &str = "^[A-Za-z0-9._:-]+$";

/// The request's correlation id, in request extensions.
#[derive(Clone, Debug)]
pub struct CorrelationId(pub String);

/// The request's span, in request extensions, for [`record_route`].
#[derive(Clone, Debug)]
struct RequestSpan(tracing::Span);

fn is_valid(value: &str) -> bool {
    !value.is_empty()
        && value.len() <= MAX_LEN
        && value
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.' | b':'))
}

/// The correlation id a request asks for, if any: a valid `X-Correlation-Id`, else the trace id
/// of a valid `traceparent`.
fn requested(headers: &axum::http::HeaderMap) -> Option<String> {
    let header = |name| headers.get(name).and_then(|value: &HeaderValue| value.to_str().ok());
    header(HEADER)
        .filter(|value| is_valid(value))
        .map(str::to_string)
        .or_else(|| header(TRACEPARENT).and_then(telemetry::traceparent_trace_id))
}

pub async fn middleware(mut request: Request, next: Next) -> Response {
    let id = requested(request.headers()).unwrap_or_else(|| Uuid::now_v7().to_string());
    request.extensions_mut().insert(CorrelationId(id.clone()));
    let method = request.method().clone();
    let span = tracing::info_span!(
        "request",
        correlation_id = %id,
        method = %method,
        path = %request.uri().path(),
        route = Empty,
        status = Empty,
        otel.name = %method,
        otel.kind = "server",
        otel.status_code = Empty,
    );
    telemetry::continue_remote_trace(&span, request.headers());
    request.extensions_mut().insert(RequestSpan(span.clone()));
    let mut response = {
        let _entered = span.enter();
        tracing::debug!("request started");
        drop(_entered);
        tracing::Instrument::instrument(next.run(request), span.clone()).await
    };
    let status = response.status().as_u16();
    span.record("status", status);
    if response.status().is_server_error() {
        span.record("otel.status_code", "error");
    }
    span.in_scope(|| tracing::info!(status, "request finished"));
    if let Ok(value) = HeaderValue::from_str(&id) {
        response.headers_mut().insert(HEADER, value);
    }
    response
}

/// Names the request span after the route that matched (a `route_layer`, so it runs only for
/// requests that found a route).
pub async fn record_route(request: Request, next: Next) -> Response {
    if let (Some(RequestSpan(span)), Some(route)) = (
        request.extensions().get::<RequestSpan>(),
        request.extensions().get::<MatchedPath>(),
    ) {
        span.record("route", route.as_str());
        telemetry::name_span(span, format!("{} {}", request.method(), route.as_str()), route.as_str());
    }
    next.run(request).await
}

#[cfg(test)]
mod tests {
    #[test]
    fn validity() {
        assert!(super::is_valid("abc-123_x.y:z"));
        assert!(!super::is_valid(""));
        assert!(!super::is_valid("has space"));
        assert!(!super::is_valid(&"a".repeat(129)));
    }

    #[test]
    fn requested_ids() {
        use axum::http::HeaderMap;
        let mut headers = HeaderMap::new();
        assert_eq!(super::requested(&headers), None);
        headers.insert(
            "traceparent",
            "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01"
                .parse()
                .unwrap(),
        );
        assert_eq!(
            super::requested(&headers).as_deref(),
            Some("4bf92f3577b34da6a3ce929d0e0e4736")
        );
        headers.insert("x-correlation-id", "mine-1".parse().unwrap());
        assert_eq!(super::requested(&headers).as_deref(), Some("mine-1"));
        headers.insert("x-correlation-id", "not valid".parse().unwrap());
        assert_eq!(
            super::requested(&headers).as_deref(),
            Some("4bf92f3577b34da6a3ce929d0e0e4736")
        );
        headers.insert("traceparent", "garbage".parse().unwrap());
        assert_eq!(super::requested(&headers), None);
    }
}
