//! Correlation ids: every request gets one (the caller's, when it sent a valid
//! `X-Correlation-Id`, else a new UUID), it is echoed on the response, recorded with the order,
//! its events and jobs, and attached to the request's log span.

use axum::extract::Request;
use axum::http::HeaderValue;
use axum::middleware::Next;
use axum::response::Response;
use uuid::Uuid;

pub const HEADER: &str = "x-correlation-id";
const MAX_LEN: usize = 128;

/// The request's correlation id, in request extensions.
#[derive(Clone, Debug)]
pub struct CorrelationId(pub String);

fn is_valid(value: &str) -> bool {
    !value.is_empty()
        && value.len() <= MAX_LEN
        && value
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.' | b':'))
}

pub async fn middleware(mut request: Request, next: Next) -> Response {
    let id = request
        .headers()
        .get(HEADER)
        .and_then(|value| value.to_str().ok())
        .filter(|value| is_valid(value))
        .map(str::to_string)
        .unwrap_or_else(|| Uuid::now_v7().to_string());
    request.extensions_mut().insert(CorrelationId(id.clone()));
    let span =
        tracing::info_span!("request", correlation_id = %id, method = %request.method(), path = %request.uri().path());
    let mut response = {
        let _entered = span.enter();
        tracing::debug!("request started");
        drop(_entered);
        tracing::Instrument::instrument(next.run(request), span.clone()).await
    };
    span.in_scope(|| tracing::info!(status = response.status().as_u16(), "request finished"));
    if let Ok(value) = HeaderValue::from_str(&id) {
        response.headers_mut().insert(HEADER, value);
    }
    response
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
}
