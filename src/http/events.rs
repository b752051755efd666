//! The event feed: `GET /events`, every committed event in position order as CloudEvents, for
//! integrators that pull (roles `admin` or `integrations`). A reader keeps the `last_position` of
//! each answer and asks for what follows it; `Prefer: wait=N` long-polls for new events.
//!
//! Positions become visible in increasing order with no hole (see `store::events`), so "after
//! N" never skips a late committer. `last_position` is computed from the feed's bounds read
//! *before* the page: a full page ends at its last event; a short page has everything up to the
//! bounds' last position, so the reader may continue from there even when a type filter skipped
//! every event in between.

use std::time::Duration;

use axum::Json;
use axum::extract::{RawQuery, State};
use axum::http::{HeaderMap, HeaderValue};
use axum::response::{IntoResponse, Response};
use chrono::{DateTime, Utc};
use serde::Serialize;
use serde_json::{Value, json};
use utoipa::openapi::path::{Parameter, ParameterIn};
use utoipa::openapi::schema::{KnownFormat, Object, ObjectBuilder, SchemaFormat, Type};
use utoipa::{IntoParams, ToSchema};
use utoipa_axum::router::OpenApiRouter;
use utoipa_axum::routes;
use uuid::Uuid;

use super::auth::Principal;
use super::error::{ApiError, Problem};
use super::extract::{QueryParams, parameter, whole_number};
use super::orders::{MAX_WAIT_SECS, prefer_pattern, preferred_wait};
use super::{AppState, private};
use crate::domain::events::{EventType, TypePattern};
use crate::store::events::{EventQuery, FeedBounds, MAX_BATCH};

/// The roles that may read the feed.
pub const FEED_ROLES: [&str; 2] = ["admin", "integrations"];
/// Events per page when no `limit` is given.
pub const FEED_LIMIT_DEFAULT: u32 = 100;
/// Smallest and largest `limit` of a feed page (the store's largest batch).
pub const FEED_LIMIT_MIN: u32 = 1;
pub const FEED_LIMIT_MAX: u32 = MAX_BATCH;
/// How often a long-poll looks for new events.
const POLL_EVERY: Duration = Duration::from_millis(100);

pub fn routes() -> OpenApiRouter<AppState> {
    OpenApiRouter::default().routes(routes!(feed))
}

/// Every value [`TypePattern::parse`] accepts: `*`, each prefix (`order.*`), each type.
pub fn type_patterns() -> Vec<String> {
    let mut patterns = vec!["*".to_string()];
    for event_type in EventType::ALL {
        let prefix = format!("{}.*", event_type.as_str().split('.').next().unwrap_or_default());
        if !patterns.contains(&prefix) {
            patterns.push(prefix);
        }
    }
    patterns.extend(EventType::ALL.iter().map(|t| t.as_str().to_string()));
    patterns
}

/// An event type filter as the schema publishes it (the values [`TypePattern::parse`] accepts).
pub fn type_pattern(description: &str) -> Object {
    ObjectBuilder::new()
        .schema_type(Type::String)
        .enum_values(Some(type_patterns()))
        .max_length(Some(TypePattern::MAX_LEN))
        .description(Some(description))
        .build()
}

fn event_type() -> Object {
    ObjectBuilder::new()
        .schema_type(Type::String)
        .enum_values(Some(EventType::ALL.map(EventType::as_str)))
        .description(Some("What happened (API.md \"Events out\" lists the types)."))
        .build()
}

fn specversion() -> Object {
    ObjectBuilder::new()
        .schema_type(Type::String)
        .enum_values(Some(["1.0"]))
        .description(Some("CloudEvents 1.0."))
        .build()
}

fn datacontenttype() -> Object {
    ObjectBuilder::new()
        .schema_type(Type::String)
        .enum_values(Some(["application/json"]))
        .build()
}

fn position(description: &str) -> Object {
    ObjectBuilder::new()
        .schema_type(Type::Integer)
        .format(Some(SchemaFormat::KnownFormat(KnownFormat::Int64)))
        .minimum(Some(0))
        .description(Some(description))
        .build()
}

fn event_position() -> Object {
    let mut schema = position(
        "Global, strictly increasing and gap-free across all events: a reader that has seen N has seen every \
         event at or below N.",
    );
    schema.minimum = Some(1.into());
    schema
}

fn event_sequence() -> Object {
    let mut schema = position("Per subject (order): 1, 2, 3 … with no gap, in the order the facts happened.");
    schema.minimum = Some(1.into());
    schema
}

fn last_position() -> Object {
    position(
        "Where the next read continues (`after`): the last event's position when the page is full, else the \
         feed's last position (events a type filter skipped included).",
    )
}

/// One event, the CloudEvents 1.0 structured JSON every channel (feed, NATS, webhooks) sends.
#[derive(ToSchema)]
#[schema(as = CloudEvent)]
#[allow(dead_code)] // The schema of `StoredEvent::cloud_event`, never built itself.
struct CloudEventSchema {
    #[schema(schema_with = specversion)]
    specversion: String,
    /// The event's identity: the same on every channel and every retry (the dedup key).
    id: Uuid,
    /// `--events-source` (default `orderflow`).
    source: String,
    #[schema(rename = "type", schema_with = event_type)]
    kind: String,
    /// `orders/<order_id>`, or `webhook-endpoints/<endpoint_id>`.
    subject: String,
    /// When the fact happened (RFC 3339, microseconds).
    time: DateTime<Utc>,
    #[schema(schema_with = datacontenttype)]
    datacontenttype: String,
    #[schema(schema_with = event_sequence)]
    sequence: i64,
    #[schema(schema_with = event_position)]
    position: i64,
    /// The `X-Correlation-Id` of the request that started the order's story.
    #[schema(nullable = false)]
    correlationid: Option<String>,
    /// The `--region` of the process that accepted the order (`data.order.region`); absent when
    /// it had none.
    #[schema(nullable = false)]
    region: Option<String>,
    /// `order`: the order as GET /orders/{id} shows it (without its timeline), plus the facts
    /// of the type (`reason`, `refund`, `shipment`, `endpoint`).
    #[schema(value_type = Object)]
    data: Value,
}

/// A page of the feed.
#[derive(Serialize, ToSchema)]
#[schema(as = EventFeed)]
struct FeedView {
    /// Events after `after`, in position order.
    #[schema(value_type = Vec<CloudEventSchema>)]
    data: Vec<Value>,
    #[schema(schema_with = last_position)]
    last_position: i64,
    /// The newest position handed out so far (0 before the first event): how far behind this
    /// reader is, and where the newest events are, in one cheap read.
    #[schema(minimum = 0)]
    head_position: i64,
}

/// The query and headers of GET /events.
struct FeedParams;

impl IntoParams for FeedParams {
    fn into_params(_: impl Fn() -> Option<ParameterIn>) -> Vec<Parameter> {
        vec![
            parameter(
                "after",
                ParameterIn::Query,
                false,
                "Events strictly after this position: 0 (the default) for the oldest kept, else the \
                 `last_position` of the previous answer.",
                {
                    let mut schema = position("A position.");
                    schema.default = Some(json!(0));
                    schema
                },
            ),
            parameter(
                "limit",
                ParameterIn::Query,
                false,
                "Most events in the answer.",
                ObjectBuilder::new()
                    .schema_type(Type::Integer)
                    .format(Some(SchemaFormat::KnownFormat(KnownFormat::Int32)))
                    .minimum(Some(FEED_LIMIT_MIN))
                    .maximum(Some(FEED_LIMIT_MAX))
                    .default(Some(FEED_LIMIT_DEFAULT.into())),
            ),
            parameter(
                "type",
                ParameterIn::Query,
                false,
                "Only events of this type, or of a prefix (`order.*`); `*` is every type.",
                type_pattern("An event type, `<prefix>.*`, or `*`."),
            ),
            parameter(
                "Prefer",
                ParameterIn::Header,
                false,
                &format!(
                    "`wait=N` (RFC 7240): when no event follows `after`, wait up to N seconds (at most \
                     {MAX_WAIT_SECS}; larger values are capped) for one, then answer. Applied waits are echoed \
                     in `Preference-Applied`."
                ),
                ObjectBuilder::new()
                    .schema_type(Type::String)
                    .pattern(Some(prefer_pattern()))
                    .examples(["wait=10"]),
            ),
        ]
    }
}

/// A whole number query parameter in `min..=max`.
fn number_param(params: &QueryParams, name: &str, default: i64, min: i64, max: i64) -> Result<i64, ApiError> {
    match params.get(name) {
        None => Ok(default),
        Some(text) => whole_number(text).filter(|n| (min..=max).contains(n)).ok_or_else(|| {
            ApiError::invalid_field(
                format!("query.{name}"),
                if max == i64::MAX {
                    format!("must be a whole number of at least {min}")
                } else {
                    format!("must be a whole number from {min} to {max}")
                },
            )
        }),
    }
}

/// The oldest position still kept (the next one to come when none is), when a reader at
/// `after` has missed events that were pruned.
fn pruned_past(bounds: &FeedBounds, after: i64) -> Option<i64> {
    let oldest = bounds.oldest.unwrap_or(bounds.last.saturating_add(1));
    (after < oldest - 1).then_some(oldest)
}

/// 410 `events_pruned`: the reader is behind what is kept.
fn pruned(after: i64, oldest: i64) -> Response {
    ApiError::gone(
        "events_pruned",
        format!(
            "events after position {after} up to {} are no longer kept (retention); continue from \
             after={} and rebuild what was missed from the source of truth",
            oldest - 1,
            oldest - 1
        ),
    )
    .with_extra(json!({ "oldest_position": oldest }))
    .into_response()
}

/// Read the event feed
///
/// Roles `admin` or `integrations`. Every business fact as a CloudEvent, in position order,
/// after `after`; answers `last_position`, the `after` of the next read. `Prefer: wait=N`
/// long-polls: with nothing to return, the answer waits until a matching event is committed
/// (or N seconds). Events are kept for `--event-retention` (default 30 days); a reader behind
/// that gets 410 `events_pruned` with the `oldest_position` still kept.
#[utoipa::path(
    get,
    path = "/events",
    operation_id = "listEvents",
    tag = "events",
    security(("bearer" = [])),
    params(FeedParams),
    responses(
        (status = 200, description = "Events after `after` (possibly none) and where to continue.", body = FeedView, headers(
            ("Preference-Applied" = String, description = "`wait=N` when a wait was honoured."),
            ("Cache-Control" = String, description = "`private, no-store`."),
        )),
        (status = 403, description = "Neither the `admin` nor the `integrations` role.", body = Problem, content_type = "application/problem+json"),
        (status = 410, description = "`events_pruned`: events after `after` are no longer kept; `oldest_position` (a member of the problem) is the oldest position the feed still has (or the next one, when it keeps none): continue with `after` = `oldest_position` − 1.", body = Problem, content_type = "application/problem+json"),
    ),
)]
async fn feed(
    State(state): State<AppState>,
    principal: Principal,
    RawQuery(raw): RawQuery,
    headers: HeaderMap,
) -> Result<Response, ApiError> {
    if !FEED_ROLES.iter().any(|role| principal.has_role(role)) {
        return Err(ApiError::forbidden(
            "the event feed needs the admin or integrations role",
        ));
    }
    let params = QueryParams::of::<FeedParams>(raw.as_deref())?;
    let after = number_param(&params, "after", 0, 0, i64::MAX)?;
    let limit = number_param(
        &params,
        "limit",
        i64::from(FEED_LIMIT_DEFAULT),
        i64::from(FEED_LIMIT_MIN),
        i64::from(FEED_LIMIT_MAX),
    )? as u32;
    let types = params
        .get("type")
        .map(|text| TypePattern::parse(text).map_err(|message| ApiError::invalid_field("query.type", message)))
        .transpose()?;
    let wait = preferred_wait(&headers)?;

    let events = state.store.events();
    let query = EventQuery { after, limit, types };
    let mut bounds = events.event_bounds().await?;
    if let Some(oldest) = pruned_past(&bounds, after) {
        return Ok(pruned(after, oldest));
    }
    let mut page = events.events_after(&query).await?;
    if let Some(seconds) = wait
        && page.is_empty()
    {
        let until = tokio::time::Instant::now() + Duration::from_secs(seconds);
        while page.is_empty() && tokio::time::Instant::now() < until {
            tokio::time::sleep(POLL_EVERY.min(until - tokio::time::Instant::now())).await;
            if events.last_position().await? > bounds.last {
                // Bounds first, then the page: everything up to their `last` is visible to it.
                bounds = events.event_bounds().await?;
                page = events.events_after(&query).await?;
            }
        }
    }
    // Events pruned between reading the bounds and the page would leave a hole before the page:
    // unless the page starts right after `after`, look at what is kept again.
    if page
        .first()
        .is_none_or(|first| first.position != after.saturating_add(1))
    {
        let again = events.event_bounds().await?;
        if let Some(oldest) = pruned_past(&again, after) {
            return Ok(pruned(after, oldest));
        }
    }
    // Never behind the last event returned (positions stamped between the bounds and the page
    // read are in the page).
    let last_position = match page.last() {
        Some(last) if page.len() >= limit as usize => last.position,
        last => after.max(bounds.last).max(last.map_or(0, |e| e.position)),
    };
    let source = state.events.source.as_str();
    let data = page
        .iter()
        .map(|event| serde_json::to_value(event.cloud_event(source)))
        .collect::<Result<Vec<Value>, _>>()
        .map_err(ApiError::internal)?;
    let mut response = private(Json(FeedView {
        data,
        last_position,
        head_position: bounds.last.max(last_position),
    }));
    if let Some(seconds) = wait
        && let Ok(value) = HeaderValue::from_str(&format!("wait={seconds}"))
    {
        response.headers_mut().insert("preference-applied", value);
    }
    Ok(response.into_response())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn published_patterns_are_the_accepted_patterns() {
        let patterns = type_patterns();
        assert_eq!(patterns[0], "*");
        for pattern in &patterns {
            assert!(TypePattern::parse(pattern).is_ok(), "{pattern}");
            assert!(pattern.len() <= TypePattern::MAX_LEN, "{pattern}");
        }
        for prefix in ["order.*", "payment.*", "webhook_endpoint.*"] {
            assert!(patterns.iter().any(|p| p == prefix), "{prefix}");
        }
        assert_eq!(patterns.len(), 1 + 3 + EventType::ALL.len());
    }
}
