//! Response headers every answer gets, CORS, and honest ETags under compression.

use std::sync::Arc;

use axum::extract::{Request, State};
use axum::http::{HeaderName, HeaderValue, header};
use axum::middleware::Next;
use axum::response::Response;
use tower_http::cors::{AllowOrigin, CorsLayer};

use super::{CorsSettings, Edge};

/// Sets the security headers (unless a handler chose its own, as `/docs` does for its
/// `Content-Security-Policy`) and `Cache-Control: no-store` on anything that did not say it is
/// cacheable: the API's answers are personal or live unless marked otherwise.
pub async fn security(State(edge): State<Arc<Edge>>, request: Request, next: Next) -> Response {
    let mut response = next.run(request).await;
    let headers = response.headers_mut();
    let defaults: [(HeaderName, &'static str); 6] = [
        (header::X_CONTENT_TYPE_OPTIONS, "nosniff"),
        (header::X_FRAME_OPTIONS, "DENY"),
        (header::REFERRER_POLICY, "no-referrer"),
        (
            header::CONTENT_SECURITY_POLICY,
            "default-src 'none'; frame-ancestors 'none'",
        ),
        (HeaderName::from_static("cross-origin-opener-policy"), "same-origin"),
        (header::CACHE_CONTROL, "no-store"),
    ];
    for (name, value) in defaults {
        if !headers.contains_key(&name) {
            headers.insert(name, HeaderValue::from_static(value));
        }
    }
    if !edge.settings.hsts.is_empty() && !headers.contains_key(header::STRICT_TRANSPORT_SECURITY) {
        if let Ok(value) = HeaderValue::from_str(&edge.settings.hsts) {
            headers.insert(header::STRICT_TRANSPORT_SECURITY, value);
        }
    }
    response
}

/// The CORS layer, or `None` when no origin is allowed (then no CORS header is ever sent and
/// browsers keep other origins out).
pub fn cors(settings: &CorsSettings) -> Option<CorsLayer> {
    if settings.allowed_origins.is_empty() {
        return None;
    }
    let origins = if settings.allowed_origins.iter().any(|origin| origin == "*") {
        AllowOrigin::any()
    } else {
        AllowOrigin::list(
            settings
                .allowed_origins
                .iter()
                .filter_map(|origin| HeaderValue::from_str(origin.trim_end_matches('/')).ok()),
        )
    };
    let allowed_headers: Vec<HeaderName> = settings
        .allowed_headers
        .iter()
        .filter_map(|name| HeaderName::from_bytes(name.as_bytes()).ok())
        .collect();
    let exposed = [
        "etag",
        "location",
        "retry-after",
        "x-correlation-id",
        "idempotent-replayed",
        "ratelimit-limit",
        "ratelimit-remaining",
        "ratelimit-reset",
        "ratelimit-policy",
    ]
    .map(HeaderName::from_static);
    Some(
        CorsLayer::new()
            .allow_origin(origins)
            .allow_methods(settings.allowed_methods.clone())
            .allow_headers(allowed_headers)
            .expose_headers(exposed)
            .max_age(settings.max_age),
    )
}

/// A strong ETag names one exact byte sequence, and a gzip body is a different one than the
/// identity body. So a compressed answer's ETag gets the encoding as a suffix (`"…-gzip"`), as
/// Apache does, and an `If-None-Match` carrying such a suffix is compared without it (and a
/// 304 answers with the validator the client holds).
pub async fn etag_per_encoding(mut request: Request, next: Next) -> Response {
    let mut held_suffix = None;
    if let Some(value) = request
        .headers()
        .get(header::IF_NONE_MATCH)
        .and_then(|v| v.to_str().ok())
    {
        let mut stripped = Vec::new();
        for tag in value.split(',').map(str::trim) {
            let (bare, suffix) = strip_encoding(tag);
            held_suffix = held_suffix.or(suffix);
            stripped.push(bare);
        }
        if let Ok(value) = HeaderValue::from_str(&stripped.join(", ")) {
            request.headers_mut().insert(header::IF_NONE_MATCH, value);
        }
    }
    let mut response = next.run(request).await;
    let encoding = response
        .headers()
        .get(header::CONTENT_ENCODING)
        .and_then(|v| v.to_str().ok())
        .map(str::to_owned)
        .or_else(|| {
            (response.status() == 304)
                .then_some(held_suffix.map(str::to_owned))
                .flatten()
        });
    if let Some(encoding) = encoding {
        if let Some(etag) = response.headers().get(header::ETAG).and_then(|v| v.to_str().ok()) {
            if let Some(opaque) = etag.strip_prefix('"').and_then(|e| e.strip_suffix('"')) {
                if let Ok(value) = HeaderValue::from_str(&format!("\"{opaque}-{encoding}\"")) {
                    response.headers_mut().insert(header::ETAG, value);
                }
            }
        }
    }
    response
}

/// `"abc-gzip"` → (`"abc"`, Some("gzip")).
fn strip_encoding(tag: &str) -> (String, Option<&'static str>) {
    for encoding in ["gzip", "br"] {
        if let Some(bare) = tag.strip_suffix(&format!("-{encoding}\"")) {
            return (format!("{bare}\""), Some(encoding));
        }
    }
    (tag.to_string(), None)
}

#[cfg(test)]
mod tests {
    use super::strip_encoding;

    #[test]
    fn encoding_suffixes_come_off() {
        assert_eq!(strip_encoding("\"abc-gzip\""), ("\"abc\"".into(), Some("gzip")));
        assert_eq!(strip_encoding("\"abc-br\""), ("\"abc\"".into(), Some("br")));
        assert_eq!(strip_encoding("\"abc\""), ("\"abc\"".into(), None));
        assert_eq!(strip_encoding("*"), ("*".into(), None));
    }
}
