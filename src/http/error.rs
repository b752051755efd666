//! The API's one error type, rendered as RFC 9457 problem details (`application/problem+json`)
//! with a stable machine `code`. 5xx bodies are opaque; their cause is logged here, never sent.

use axum::http::{HeaderMap, HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use serde_json::{Value, json};

use crate::domain::{FieldError, FieldErrors, ProductId};
use crate::store::{StoreError, WriteRefusal};

/// The body of every error answer (`application/problem+json`, RFC 9457), as the API schema
/// publishes it. [`ApiError`]'s `IntoResponse` renders it; a test below keeps the two in step.
#[derive(utoipa::ToSchema)]
#[allow(dead_code)] // The schema of what `IntoResponse` writes, never built itself.
pub struct Problem {
    /// `/problems/<code>`: a stable URI reference naming the problem type.
    #[schema(rename = "type", examples("/problems/validation_failed"))]
    kind: String,
    /// Short human-readable summary of the problem type.
    title: String,
    /// The HTTP status code, repeated.
    #[schema(minimum = 400, maximum = 599)]
    status: u16,
    /// What went wrong with this request, and often how to fix it.
    detail: String,
    /// Stable machine-readable code, e.g. `validation_failed`, `insufficient_stock`,
    /// `idempotency_key_reused`, `rate_limited`, `storage_full`.
    #[schema(examples("validation_failed"))]
    code: String,
    /// Every bad field (validation) or the field a refusal is about.
    #[schema(nullable = false)]
    errors: Option<Vec<FieldError>>,
    /// `unknown_product`: the product ids the catalog does not have.
    #[schema(nullable = false)]
    product_ids: Option<Vec<ProductId>>,
    /// Each line a refusal is about: `insufficient_stock` (requested and `available` units),
    /// `exceeds_unshipped` (requested and `unshipped`), `exceeds_returnable` (requested and
    /// `returnable`).
    #[schema(nullable = false)]
    items: Option<Vec<ProblemItem>>,
    /// `exceeds_refundable`: the amount asked for.
    #[schema(nullable = false, schema_with = super::schema::money_ref)]
    requested: Option<serde_json::Number>,
    /// `exceeds_refundable`: the most that can still be refunded.
    #[schema(nullable = false, schema_with = super::schema::money_ref)]
    refundable: Option<serde_json::Number>,
}

/// One line of a refused request: the product, the units asked for, and what was possible
/// (which member depends on the problem's `code`).
#[derive(utoipa::ToSchema)]
#[allow(dead_code)] // Schema only.
struct ProblemItem {
    product_id: ProductId,
    #[schema(minimum = 1)]
    requested: u32,
    /// `insufficient_stock`: units that can still be ordered.
    #[schema(nullable = false)]
    available: Option<i64>,
    /// `exceeds_unshipped`: units not yet shipped.
    #[schema(nullable = false)]
    unshipped: Option<u32>,
    /// `exceeds_returnable`: units bought and not yet restocked.
    #[schema(nullable = false)]
    returnable: Option<u32>,
}

/// An error answer. Build it with the constructors below; each documents its status.
#[derive(Debug)]
pub struct ApiError {
    status: StatusCode,
    code: &'static str,
    title: &'static str,
    detail: String,
    errors: Vec<FieldError>,
    /// Extra members merged into the problem object (e.g. the short items of an order).
    extra: Option<Value>,
    retry_after_secs: Option<u64>,
    www_authenticate: Option<String>,
    /// Further response headers (e.g. `RateLimit-*` on a 429).
    headers: HeaderMap,
}

impl ApiError {
    fn new(status: StatusCode, code: &'static str, title: &'static str, detail: impl Into<String>) -> Self {
        Self {
            status,
            code,
            title,
            detail: detail.into(),
            errors: Vec::new(),
            extra: None,
            retry_after_secs: None,
            www_authenticate: None,
            headers: HeaderMap::new(),
        }
    }

    /// 400 `validation_failed`: every bad field, each named by a JSON pointer.
    pub fn validation(errors: FieldErrors) -> Self {
        let errors = errors.into_vec();
        let detail = match errors.as_slice() {
            [one] => format!("{} {}", one.field, one.message),
            many => format!("{} fields are invalid", many.len()),
        };
        Self {
            errors,
            ..Self::new(StatusCode::BAD_REQUEST, "validation_failed", "Invalid request", detail)
        }
    }

    /// 400 `validation_failed` for one field.
    pub fn invalid_field(field: impl Into<String>, message: impl Into<String>) -> Self {
        Self::validation(FieldErrors::single(field, message))
    }

    /// 400 `malformed_json`: the body is not JSON at all.
    pub fn malformed_json(detail: impl Into<String>) -> Self {
        Self::new(StatusCode::BAD_REQUEST, "malformed_json", "Malformed JSON", detail)
    }

    /// 400 `idempotency_key_missing`.
    pub fn idempotency_key_missing() -> Self {
        Self::new(
            StatusCode::BAD_REQUEST,
            "idempotency_key_missing",
            "Idempotency-Key header required",
            "this request needs an Idempotency-Key header: generate a unique value (e.g. a UUID) per \
             attempt (a checkout, a shipment, a refund) and send the same value when retrying it",
        )
    }

    /// 401 `unauthorized` with a `WWW-Authenticate: Bearer` challenge.
    pub fn unauthorized(reason: &str) -> Self {
        let challenge = if reason == "missing" {
            "Bearer".to_string()
        } else {
            format!("Bearer error=\"invalid_token\", error_description=\"{reason}\"")
        };
        Self {
            www_authenticate: Some(challenge),
            ..Self::new(
                StatusCode::UNAUTHORIZED,
                "unauthorized",
                "Authentication required",
                match reason {
                    "missing" => "send a bearer token: Authorization: Bearer <JWT>".to_string(),
                    other => format!("the bearer token was rejected: {other}"),
                },
            )
        }
    }

    /// 403 `forbidden`: authenticated, but this principal may not do this.
    pub fn forbidden(detail: impl Into<String>) -> Self {
        Self::new(StatusCode::FORBIDDEN, "forbidden", "Forbidden", detail)
    }

    /// 404 `not_found`: no such resource, or one the principal may not know exists.
    pub fn not_found(what: &str) -> Self {
        Self::new(
            StatusCode::NOT_FOUND,
            "not_found",
            "Not found",
            format!("no such {what}"),
        )
    }

    /// 405 `method_not_allowed`.
    pub fn method_not_allowed() -> Self {
        Self::new(
            StatusCode::METHOD_NOT_ALLOWED,
            "method_not_allowed",
            "Method not allowed",
            "this resource does not support that method",
        )
    }

    /// 409 with a specific code: the request conflicts with current state.
    pub fn conflict(code: &'static str, detail: impl Into<String>) -> Self {
        Self::new(StatusCode::CONFLICT, code, "Conflict", detail)
    }

    /// 410 with `code`: what was asked for existed once and is gone for good.
    pub fn gone(code: &'static str, detail: impl Into<String>) -> Self {
        Self::new(StatusCode::GONE, code, "Gone", detail)
    }

    /// 413 `payload_too_large`.
    pub fn payload_too_large(limit: usize) -> Self {
        Self::new(
            StatusCode::PAYLOAD_TOO_LARGE,
            "payload_too_large",
            "Request body too large",
            format!("request bodies may be at most {limit} bytes"),
        )
    }

    /// 415 `unsupported_media_type`.
    pub fn unsupported_media_type() -> Self {
        Self::new(
            StatusCode::UNSUPPORTED_MEDIA_TYPE,
            "unsupported_media_type",
            "Unsupported media type",
            "send the body as JSON with Content-Type: application/json",
        )
    }

    /// 422 with a specific code: well-formed, but the business rules refuse it.
    pub fn unprocessable(code: &'static str, title: &'static str, detail: impl Into<String>) -> Self {
        Self::new(StatusCode::UNPROCESSABLE_ENTITY, code, title, detail)
    }

    /// 503 `service_unavailable` with `Retry-After`.
    pub fn unavailable(detail: impl Into<String>) -> Self {
        Self {
            retry_after_secs: Some(1),
            ..Self::new(
                StatusCode::SERVICE_UNAVAILABLE,
                "service_unavailable",
                "Service unavailable",
                detail,
            )
        }
    }

    /// 429 `rate_limited`: this principal (or client IP) used up its budget for a route class.
    pub fn rate_limited(class: &str, retry_after_secs: u64) -> Self {
        Self {
            retry_after_secs: Some(retry_after_secs),
            ..Self::new(
                StatusCode::TOO_MANY_REQUESTS,
                "rate_limited",
                "Too many requests",
                format!("the rate limit for {class} requests is used up; retry after {retry_after_secs} s"),
            )
        }
    }

    /// 503 `overloaded`: more requests in progress than the service takes on at once.
    pub fn overloaded(detail: impl Into<String>) -> Self {
        Self {
            code: "overloaded",
            ..Self::unavailable(detail)
        }
    }

    /// 503 `storage_full` or `database_read_only` with `Retry-After`: the database answers reads
    /// but takes no writes until an operator frees space or makes it writable again.
    pub fn writes_refused(reason: WriteRefusal) -> Self {
        let (code, detail) = match reason {
            WriteRefusal::StorageFull => (
                "storage_full",
                "the database's storage is full, so nothing can be written now (reads still work); retry \
                 later (a POST /orders retried with the same Idempotency-Key places the order once)",
            ),
            WriteRefusal::ReadOnly => (
                "database_read_only",
                "the database is read-only, so nothing can be written now (reads still work); retry later \
                 (a POST /orders retried with the same Idempotency-Key places the order once)",
            ),
        };
        Self {
            code,
            ..Self::unavailable(detail)
        }
    }

    /// 503 `timed_out`: the handler ran past its time limit.
    pub fn timed_out(limit: std::time::Duration) -> Self {
        Self {
            code: "timed_out",
            ..Self::unavailable(format!(
                "the request took longer than {} ms; retry (a POST /orders retried with the same \
                 Idempotency-Key returns the original outcome)",
                limit.as_millis()
            ))
        }
    }

    /// 408 `body_timeout`: the client sent its request body too slowly.
    pub fn body_timeout(limit: std::time::Duration) -> Self {
        Self::new(
            StatusCode::REQUEST_TIMEOUT,
            "body_timeout",
            "Request body too slow",
            format!("the request body did not arrive within {} ms", limit.as_millis()),
        )
    }

    /// Adds response headers.
    pub fn extend_headers(&mut self, headers: HeaderMap) {
        self.headers.extend(headers);
    }

    /// 500 `internal_error`. The cause is logged; the client sees nothing of it.
    pub fn internal(cause: impl std::fmt::Display) -> Self {
        tracing::error!(error = %cause, "internal error");
        Self::new(
            StatusCode::INTERNAL_SERVER_ERROR,
            "internal_error",
            "Internal server error",
            "something went wrong on our side; it has been logged",
        )
    }

    /// Adds members to the problem object.
    pub fn with_extra(mut self, extra: Value) -> Self {
        self.extra = Some(extra);
        self
    }

    /// Adds field errors to a non-validation problem (e.g. which field was forbidden).
    pub fn with_field(mut self, field: impl Into<String>, message: impl Into<String>) -> Self {
        self.errors.push(FieldError {
            field: field.into(),
            message: message.into(),
        });
        self
    }

    pub fn status(&self) -> StatusCode {
        self.status
    }

    pub fn code(&self) -> &'static str {
        self.code
    }

    pub fn errors(&self) -> &[FieldError] {
        &self.errors
    }
}

impl From<StoreError> for ApiError {
    fn from(error: StoreError) -> Self {
        match error {
            StoreError::Unavailable(cause) => {
                tracing::warn!(%cause, "database unavailable");
                ApiError::unavailable("the service is busy; retry shortly")
            }
            StoreError::Contended(cause) => {
                tracing::warn!(%cause, "too much contention on the database");
                ApiError::unavailable("too many concurrent changes to the same data; retry shortly")
            }
            StoreError::WritesRefused(reason, cause) => {
                tracing::warn!(%cause, %reason, "database takes no writes");
                ApiError::writes_refused(reason)
            }
            StoreError::Conflict(field) => {
                ApiError::conflict("already_exists", format!("a record with this {field} already exists"))
                    .with_field(format!("/{field}"), "already in use")
            }
            other => ApiError::internal(other),
        }
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let mut body = json!({
            "type": format!("/problems/{}", self.code),
            "title": self.title,
            "status": self.status.as_u16(),
            "detail": self.detail,
            "code": self.code,
        });
        if !self.errors.is_empty() {
            body["errors"] = json!(self.errors);
        }
        if let (Some(Value::Object(extra)), Value::Object(members)) = (self.extra, &mut body) {
            members.extend(extra);
        }
        let mut response = (self.status, body.to_string()).into_response();
        let headers = response.headers_mut();
        headers.insert(
            header::CONTENT_TYPE,
            HeaderValue::from_static("application/problem+json"),
        );
        if let Some(secs) = self.retry_after_secs {
            headers.insert(header::RETRY_AFTER, HeaderValue::from(secs));
        }
        headers.extend(self.headers);
        if let Some(challenge) = self.www_authenticate.and_then(|c| HeaderValue::from_str(&c).ok()) {
            headers.insert(header::WWW_AUTHENTICATE, challenge);
        }
        response
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::domain::Shortage;

    /// Every member a problem can carry is one the published `Problem` schema names.
    #[tokio::test]
    async fn rendered_problems_match_the_schema() {
        use utoipa::PartialSchema;
        let schema = serde_json::to_value(Problem::schema()).unwrap();
        let documented: Vec<&str> = schema["properties"]
            .as_object()
            .unwrap()
            .keys()
            .map(String::as_str)
            .collect();
        let id = ProductId::new();
        let problems = [
            ApiError::invalid_field("/name", "is required"),
            ApiError::unavailable("busy"),
            ApiError::writes_refused(WriteRefusal::StorageFull),
            ApiError::unprocessable("unknown_product", "Unknown product", "no")
                .with_extra(json!({ "product_ids": [id] })),
            ApiError::unprocessable("insufficient_stock", "Insufficient stock", "no").with_extra(json!({
                "items": [Shortage { product_id: id, requested: 2, available: 1 }]
            })),
        ];
        for problem in problems {
            let response = problem.into_response();
            let bytes = axum::body::to_bytes(response.into_body(), usize::MAX).await.unwrap();
            let body: Value = serde_json::from_slice(&bytes).unwrap();
            for key in body.as_object().unwrap().keys() {
                assert!(
                    documented.contains(&key.as_str()),
                    "`{key}` is not in the Problem schema"
                );
            }
        }
    }
}
