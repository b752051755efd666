//! Extractors whose rejections are problem+json like every other error: JSON bodies (unknown
//! fields refused, the failing field named), the Idempotency-Key header, id path segments and
//! query parameters. The limits they enforce are declared here once and published in the API
//! schema from the same constants (the `IntoParams` impls below).

use std::collections::HashMap;

use axum::body::Bytes;
use axum::extract::rejection::BytesRejection;
use axum::extract::{FromRequest, FromRequestParts, Request};
use axum::http::header;
use axum::http::request::Parts;
use serde::de::DeserializeOwned;
use utoipa::IntoParams;
use utoipa::openapi::path::{Parameter, ParameterBuilder, ParameterIn};
use utoipa::openapi::schema::{KnownFormat, ObjectBuilder, SchemaFormat, Type};
use utoipa::openapi::{RefOr, Required, Schema};

use super::error::ApiError;
use crate::domain::FieldErrors;

/// Idempotency keys: 1 to 255 printable ASCII characters.
pub const IDEMPOTENCY_KEY_MAX: usize = 255;
/// The same rule as a regular expression. It also rules out leading and trailing spaces, which
/// HTTP strips from header values before the service sees them.
pub const IDEMPOTENCY_KEY_PATTERN: &str = "^[!-~]([ -~]*[!-~])?$";

/// Page size (`limit`) when none is asked for.
pub const LIMIT_DEFAULT: u32 = 50;
/// Smallest and largest `limit`.
pub const LIMIT_MIN: u32 = 1;
pub const LIMIT_MAX: u32 = 200;
/// Cursors are the 32-hex-digit simple form of the id a page ended at.
pub const CURSOR_LEN: usize = 32;
pub const CURSOR_PATTERN: &str = "^[0-9a-fA-F]{32}$";

/// A documented request parameter.
pub fn parameter(
    name: &str,
    location: ParameterIn,
    required: bool,
    description: &str,
    schema: impl Into<RefOr<Schema>>,
) -> Parameter {
    ParameterBuilder::new()
        .name(name)
        .parameter_in(location)
        .required(if required { Required::True } else { Required::False })
        .description(Some(description))
        .schema(Some(schema))
        .build()
}

/// The `limit` query parameter, as [`QueryParams::limit`] enforces it.
pub fn limit_parameter() -> Parameter {
    parameter(
        "limit",
        ParameterIn::Query,
        false,
        "Page size.",
        ObjectBuilder::new()
            .schema_type(Type::Integer)
            .format(Some(SchemaFormat::KnownFormat(KnownFormat::Int32)))
            .minimum(Some(LIMIT_MIN))
            .maximum(Some(LIMIT_MAX))
            .default(Some(LIMIT_DEFAULT.into())),
    )
}

/// The `cursor` query parameter, as [`QueryParams::cursor`] enforces it.
pub fn cursor_parameter() -> Parameter {
    parameter(
        "cursor",
        ParameterIn::Query,
        false,
        "Where the page starts: the `next_cursor` of the previous page (opaque).",
        ObjectBuilder::new()
            .schema_type(Type::String)
            .min_length(Some(CURSOR_LEN))
            .max_length(Some(CURSOR_LEN))
            .pattern(Some(CURSOR_PATTERN)),
    )
}

/// `limit` and `cursor`: the query of a plain list.
pub struct PageParams;

impl IntoParams for PageParams {
    fn into_params(_: impl Fn() -> Option<ParameterIn>) -> Vec<Parameter> {
        vec![limit_parameter(), cursor_parameter()]
    }
}

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
        let body_timeout = request.extensions().get::<BodyTimeout>().map(|t| t.0);
        let read = Bytes::from_request(request, state);
        let read = match body_timeout {
            Some(limit) => tokio::time::timeout(limit, read)
                .await
                .map_err(|_| ApiError::body_timeout(limit))?,
            None => read.await,
        };
        let bytes = read.map_err(|rejection| match rejection {
            BytesRejection::FailedToBufferBody(_) if rejection.status() == 413 => ApiError::payload_too_large(limit),
            other => ApiError::malformed_json(other.body_text()),
        })?;
        parse_json(&bytes).map(ApiJson)
    }
}

/// The value of a JSON number's text when it is a whole number, as JSON Schema's `integer`
/// means it: `3`, `3.0`, `3e2`, `350e-2` (but not `35e-1`, which is 3.5). Exact decimal
/// arithmetic on the digits, never a float. `None` for fractions and for values outside `i64`.
pub fn whole_number(text: &str) -> Option<i64> {
    let (mantissa, exponent) = match text.find(['e', 'E']) {
        Some(at) => (&text[..at], text[at + 1..].parse::<i32>().ok()?),
        None => (text, 0),
    };
    let (negative, mantissa) = match mantissa.strip_prefix('-') {
        Some(rest) => (true, rest),
        None => (false, mantissa),
    };
    let (whole, fraction) = mantissa.split_once('.').unwrap_or((mantissa, ""));
    if whole.is_empty() || !whole.bytes().chain(fraction.bytes()).all(|b| b.is_ascii_digit()) {
        return None;
    }
    let mut digits: String = format!("{whole}{fraction}").trim_start_matches('0').to_string();
    let mut scale = i64::from(exponent) - fraction.len() as i64;
    while scale < 0 && !digits.is_empty() {
        if !digits.ends_with('0') {
            return None;
        }
        digits.pop();
        scale += 1;
    }
    if digits.is_empty() {
        return Some(0);
    }
    if digits.len() as i64 + scale > 19 {
        return None;
    }
    digits.extend(std::iter::repeat_n('0', scale.max(0) as usize));
    let magnitude: i128 = digits.parse().ok()?;
    i64::try_from(if negative { -magnitude } else { magnitude }).ok()
}

/// Deserializes an optional whole number written any way JSON allows (`2`, `2.0`, `2e0`).
pub fn optional_whole_number<'de, D: serde::Deserializer<'de>>(deserializer: D) -> Result<Option<i64>, D::Error> {
    use serde::Deserialize;
    match Option::<serde_json::Number>::deserialize(deserializer)? {
        None => Ok(None),
        Some(number) => whole_number(&number.to_string())
            .map(Some)
            .ok_or_else(|| serde::de::Error::custom(format!("expected a whole number, got {number}"))),
    }
}

/// The configured body limit, put in request extensions so rejections can name it.
#[derive(Clone, Copy, Debug)]
pub struct BodyLimit(pub usize);

/// The longest a client may take to send its body, put in request extensions by the edge.
#[derive(Clone, Copy, Debug)]
pub struct BodyTimeout(pub std::time::Duration);

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

impl IntoParams for IdempotencyKey {
    fn into_params(_: impl Fn() -> Option<ParameterIn>) -> Vec<Parameter> {
        vec![parameter(
            "Idempotency-Key",
            ParameterIn::Header,
            true,
            "A unique value per attempt (e.g. a UUID), sent again unchanged when retrying that attempt. The same \
             key with the same body replays the first answer (`Idempotent-Replayed: true`); with a different body \
             → 422 `idempotency_key_reused`. Checkouts (POST /orders): scoped to the caller, remembered for the \
             server's `--idempotency-retention` (default 24 hours; a request after that is new and places a new \
             order), and 409 `idempotency_key_in_use` while the first request is still running. Shipments and \
             refunds: scoped to the order, kept with the shipment or refund (for good).",
            ObjectBuilder::new()
                .schema_type(Type::String)
                .min_length(Some(1))
                .max_length(Some(IDEMPOTENCY_KEY_MAX))
                .pattern(Some(IDEMPOTENCY_KEY_PATTERN)),
        )]
    }
}

impl<S: Send + Sync> FromRequestParts<S> for IdempotencyKey {
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, _state: &S) -> Result<Self, ApiError> {
        let Some(value) = parts.headers.get("idempotency-key") else {
            return Err(ApiError::idempotency_key_missing());
        };
        let key = value.to_str().ok().filter(|key| {
            !key.is_empty()
                && key.len() <= IDEMPOTENCY_KEY_MAX
                && key.bytes().all(|b| (0x20..0x7f).contains(&b))
                && !key.starts_with(' ')
                && !key.ends_with(' ')
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
    /// Parses a query whose accepted names are the query parameters `P` documents.
    pub fn of<P: IntoParams>(raw: Option<&str>) -> Result<Self, ApiError> {
        let names: Vec<String> = P::into_params(|| Some(ParameterIn::Query))
            .into_iter()
            .filter(|p| p.parameter_in == ParameterIn::Query)
            .map(|p| p.name)
            .collect();
        Self::parse(raw, &names.iter().map(String::as_str).collect::<Vec<_>>())
    }

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

    /// `limit`: default [`LIMIT_DEFAULT`], [`LIMIT_MIN`] to [`LIMIT_MAX`].
    pub fn limit(&self) -> Result<u32, ApiError> {
        match self.get("limit") {
            None => Ok(LIMIT_DEFAULT),
            Some(text) => whole_number(text)
                .filter(|n| (i64::from(LIMIT_MIN)..=i64::from(LIMIT_MAX)).contains(n))
                .map(|n| n as u32)
                .ok_or_else(|| {
                    ApiError::invalid_field(
                        "query.limit",
                        format!("must be a whole number from {LIMIT_MIN} to {LIMIT_MAX}"),
                    )
                }),
        }
    }

    /// `cursor`: the opaque value of a previous page's `next_cursor` ([`CURSOR_LEN`] hex digits).
    pub fn cursor<T: std::str::FromStr>(&self) -> Result<Option<T>, ApiError> {
        self.get("cursor")
            .map(|text| {
                Some(text)
                    .filter(|t| t.len() == CURSOR_LEN && t.bytes().all(|b| b.is_ascii_hexdigit()))
                    .and_then(|t| t.parse().ok())
                    .ok_or_else(|| ApiError::invalid_field("query.cursor", "is not a cursor this API returned"))
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
    fn whole_numbers_in_any_spelling() {
        for (text, value) in [
            ("3", 3),
            ("3.0", 3),
            ("3.00", 3),
            ("3e2", 300),
            ("-0", 0),
            ("0.0", 0),
            ("3500e-2", 35),
        ] {
            assert_eq!(whole_number(text), Some(value), "{text}");
        }
        assert_eq!(whole_number("35e-1"), None);
        assert_eq!(whole_number("351e-2"), None);
        assert_eq!(whole_number("-9223372036854775808"), Some(i64::MIN));
        assert_eq!(whole_number("9223372036854775808"), None);
        assert_eq!(whole_number("1e400"), None);
        assert_eq!(whole_number("1.5"), None);
        assert_eq!(whole_number("abc"), None);
        assert_eq!(whole_number(""), None);
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

/// One `{product_id, quantity}` entry of a request (a checkout line, a shipped or restocked
/// item) at `{list}/{index}`: both required, every bad field recorded in `errors`.
pub fn product_quantity(
    errors: &mut crate::domain::FieldErrors,
    list: &str,
    index: usize,
    product_id: Option<String>,
    quantity: Option<i64>,
) -> Option<(crate::domain::ProductId, crate::domain::Quantity)> {
    let product_id = match product_id {
        None => {
            errors.add(format!("{list}/{index}/product_id"), "is required");
            None
        }
        Some(id) => errors.check(
            &format!("{list}/{index}/product_id"),
            id.parse::<crate::domain::ProductId>()
                .map_err(|_| "must be a UUID".to_string()),
        ),
    };
    let quantity = match quantity {
        None => {
            errors.add(format!("{list}/{index}/quantity"), "is required");
            None
        }
        Some(quantity) => errors.check(
            &format!("{list}/{index}/quantity"),
            crate::domain::Quantity::parse(quantity),
        ),
    };
    Some((product_id?, quantity?))
}
