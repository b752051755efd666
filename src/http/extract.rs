//! Extractors whose rejections are problem+json like every other error: JSON bodies (unknown
//! fields refused, the failing field named), the Idempotency-Key header, and id path segments.

use std::collections::HashMap;

use axum::body::Bytes;
use axum::extract::rejection::BytesRejection;
use axum::extract::{FromRequest, FromRequestParts, Request};
use axum::http::header;
use axum::http::request::Parts;
use serde::de::DeserializeOwned;

use super::error::ApiError;
use crate::domain::FieldErrors;

/// Idempotency keys: 1 to 255 printable ASCII characters.
pub const IDEMPOTENCY_KEY_MAX: usize = 255;

/// A JSON request body of type `T`.
pub struct ApiJson<T>(pub T);

impl<T: DeserializeOwned, S: Send + Sync> FromRequest<S> for ApiJson<T> {
    type Rejection = ApiError;

    async fn from_request(request: Request, state: &S) -> Result<Self, ApiError> {
        let is_json = request
            .headers()
            .get(header::CONTENT_TYPE)
            .and_then(|value| value.to_str().ok())
            .and_then(|value| value.split(';').next())
            .map(|mime| {
                let mime = mime.trim().to_ascii_lowercase();
                mime == "application/json" || (mime.starts_with("application/") && mime.ends_with("+json"))
            })
            .unwrap_or(false);
        if !is_json {
            return Err(ApiError::unsupported_media_type());
        }
        let limit = request
            .extensions()
            .get::<BodyLimit>()
            .map(|l| l.0)
            .unwrap_or(usize::MAX);
        let bytes = Bytes::from_request(request, state)
            .await
            .map_err(|rejection| match rejection {
                BytesRejection::FailedToBufferBody(_) if rejection.status() == 413 => {
                    ApiError::payload_too_large(limit)
                }
                other => ApiError::malformed_json(other.body_text()),
            })?;
        parse_json(&bytes).map(ApiJson)
    }
}

/// The configured body limit, put in request extensions so rejections can name it.
#[derive(Clone, Copy, Debug)]
pub struct BodyLimit(pub usize);

/// Deserializes JSON, naming the offending field as a JSON pointer on failure.
pub fn parse_json<T: DeserializeOwned>(bytes: &[u8]) -> Result<T, ApiError> {
    let mut deserializer = serde_json::Deserializer::from_slice(bytes);
    let value = serde_path_to_error::deserialize(&mut deserializer).map_err(|error| {
        let pointer = json_pointer(error.path());
        let inner = error.into_inner();
        if inner.is_syntax() || inner.is_eof() {
            return ApiError::malformed_json(format!("the body is not valid JSON: {inner}"));
        }
        let message = clean_serde_message(&inner.to_string());
        // An unknown field is reported at its own path (some serde paths stop at the parent).
        let field = match unknown_field_name(&message) {
            Some(name) if !pointer.ends_with(&format!("/{name}")) => format!("{pointer}/{name}"),
            _ => pointer,
        };
        ApiError::invalid_field(if field.is_empty() { "/".into() } else { field }, message)
    })?;
    deserializer
        .end()
        .map_err(|_| ApiError::malformed_json("unexpected data after the JSON value"))?;
    Ok(value)
}

fn json_pointer(path: &serde_path_to_error::Path) -> String {
    use serde_path_to_error::Segment;
    let mut pointer = String::new();
    for segment in path.iter() {
        match segment {
            Segment::Seq { index } => pointer.push_str(&format!("/{index}")),
            Segment::Map { key } => pointer.push_str(&format!("/{}", key.replace('~', "~0").replace('/', "~1"))),
            Segment::Enum { variant } => pointer.push_str(&format!("/{variant}")),
            Segment::Unknown => {}
        }
    }
    pointer
}

/// serde messages end with " at line 1 column 17"; the pointer already says where.
fn clean_serde_message(message: &str) -> String {
    match message.rfind(" at line ") {
        Some(at) => message[..at].to_string(),
        None => message.to_string(),
    }
}

fn unknown_field_name(message: &str) -> Option<&str> {
    let rest = message.strip_prefix("unknown field `")?;
    rest.split('`').next()
}

/// The `Idempotency-Key` header, required on POST /orders.
pub struct IdempotencyKey(pub String);

impl<S: Send + Sync> FromRequestParts<S> for IdempotencyKey {
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, _state: &S) -> Result<Self, ApiError> {
        let Some(value) = parts.headers.get("idempotency-key") else {
            return Err(ApiError::idempotency_key_missing());
        };
        let key = value.to_str().ok().filter(|key| {
            !key.is_empty() && key.len() <= IDEMPOTENCY_KEY_MAX && key.bytes().all(|b| (0x20..0x7f).contains(&b))
        });
        match key {
            Some(key) => Ok(IdempotencyKey(key.to_string())),
            None => Err(ApiError::invalid_field(
                "Idempotency-Key",
                format!("must be 1 to {IDEMPOTENCY_KEY_MAX} printable ASCII characters"),
            )),
        }
    }
}

/// Parses a UUID path segment, naming it on failure.
pub fn path_id<T: std::str::FromStr>(name: &str, value: &str) -> Result<T, ApiError> {
    value
        .parse()
        .map_err(|_| ApiError::invalid_field(format!("path.{name}"), "must be a UUID"))
}

/// Query parameters with the names a route accepts; anything else is refused like an unknown
/// body field.
pub struct QueryParams(HashMap<String, String>);

impl QueryParams {
    pub fn parse(raw: Option<&str>, allowed: &[&str]) -> Result<Self, ApiError> {
        let mut params = HashMap::new();
        let mut errors = FieldErrors::new();
        for (name, value) in decode_pairs(raw.unwrap_or("")) {
            if !allowed.contains(&name.as_str()) {
                errors.add(
                    format!("query.{name}"),
                    format!("unknown parameter; expected one of: {}", allowed.join(", ")),
                );
            } else if params.insert(name.clone(), value).is_some() {
                errors.add(format!("query.{name}"), "given more than once");
            }
        }
        errors.finish(|| QueryParams(params)).map_err(ApiError::validation)
    }

    pub fn get(&self, name: &str) -> Option<&str> {
        self.0.get(name).map(String::as_str)
    }

    /// `limit`: default 50, 1 to 200.
    pub fn limit(&self) -> Result<u32, ApiError> {
        match self.get("limit") {
            None => Ok(50),
            Some(text) => text
                .parse::<u32>()
                .ok()
                .filter(|n| (1..=200).contains(n))
                .ok_or_else(|| ApiError::invalid_field("query.limit", "must be a whole number from 1 to 200")),
        }
    }

    /// `cursor`: the opaque value of a previous page's `next_cursor`.
    pub fn cursor<T: std::str::FromStr>(&self) -> Result<Option<T>, ApiError> {
        self.get("cursor")
            .map(|text| {
                text.parse()
                    .map_err(|_| ApiError::invalid_field("query.cursor", "is not a cursor this API returned"))
            })
            .transpose()
    }
}

/// Decodes `a=1&b=x%20y` pairs with axum's own query decoding.
fn decode_pairs(raw: &str) -> Vec<(String, String)> {
    axum::extract::Query::<Vec<(String, String)>>::try_from_uri(
        &format!("/?{raw}")
            .parse()
            .unwrap_or_else(|_| "/".parse().expect("static uri")),
    )
    .map(|query| query.0)
    .unwrap_or_default()
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde::Deserialize;

    #[derive(Debug, Deserialize)]
    #[serde(deny_unknown_fields)]
    #[allow(dead_code)]
    struct Body {
        items: Vec<Item>,
    }

    #[derive(Debug, Deserialize)]
    #[serde(deny_unknown_fields)]
    #[allow(dead_code)]
    struct Item {
        quantity: i64,
    }

    fn field_of(error: ApiError) -> String {
        let response = axum::response::IntoResponse::into_response(error);
        assert_eq!(response.status(), 400);
        format!("{response:?}")
    }

    #[test]
    fn names_the_bad_field() {
        let error = parse_json::<Body>(br#"{"items":[{"quantity":1},{"quantity":"two"}]}"#).unwrap_err();
        assert_eq!(error.code(), "validation_failed");
        let _ = field_of(error);
        let error = parse_json::<Body>(br#"{"items":[{"quantity":1,"colour":"red"}]}"#).unwrap_err();
        assert_eq!(error.errors()[0].field, "/items/0/colour");
        let error = parse_json::<Body>(br#"{"items":[{"quantity":1}"#).unwrap_err();
        assert_eq!(error.code(), "malformed_json");
    }

    #[test]
    fn query_params_refuse_unknown_names() {
        assert!(QueryParams::parse(Some("limit=5&colour=red"), &["limit"]).is_err());
        let params = QueryParams::parse(Some("limit=5&category=a%20b"), &["limit", "category"]).unwrap();
        assert_eq!(params.get("category"), Some("a b"));
        assert!(
            QueryParams::parse(Some("limit=500"), &["limit"])
                .unwrap()
                .limit()
                .is_err()
        );
    }
}
