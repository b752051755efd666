//! Webhook endpoints (admin only): where events are POSTed, signed with each endpoint's `whsec_`
//! secret (Standard Webhooks), which events each receives, their delivery log and replays.
//!
//! The secret is shown twice only: when the endpoint is created and when it is rotated. Every
//! other answer leaves it out. The relay (`crate::events`) does the delivering; these routes only
//! manage what it reads.

use std::borrow::Cow;
use std::time::Duration;

use axum::Json;
use axum::extract::{FromRequest, Path, RawQuery, Request, State};
use axum::http::{StatusCode, header};
use axum::response::Response;
use chrono::{DateTime, Utc};
use serde::{Deserialize, Deserializer, Serialize};
use serde_json::json;
use utoipa::openapi::RefOr;
use utoipa::openapi::path::{Parameter, ParameterIn};
use utoipa::openapi::schema::{
    AdditionalProperties, Array, ArrayBuilder, KnownFormat, Object, ObjectBuilder, OneOfBuilder, Schema, SchemaFormat,
    Type,
};
use utoipa::{IntoParams, PartialSchema, ToSchema};
use utoipa_axum::router::OpenApiRouter;
use utoipa_axum::routes;
use uuid::Uuid;

use super::auth::Admin;
use super::error::{ApiError, Problem};
use super::events::type_pattern;
use super::extract::{
    ApiJson, QueryParams, cursor_parameter, limit_parameter, optional_whole_number, parameter, path_id,
};
use super::schema::or_null;
use super::{AppState, private};
use crate::adapters::events::webhook::{WebhookSecret, validate_endpoint_url};
use crate::clock;
use crate::domain::FieldErrors;
use crate::domain::events::TypePattern;
use crate::domain::validation::{OPTIONAL_TEXT_PATTERN, optional_text};
use crate::store::events::{
    DeliveryLog, EndpointHealth, EndpointPatch, EndpointStatus, NewEndpoint, ReplayRange, WebhookEndpoint,
};

/// Longest endpoint URL, in characters (`validate_endpoint_url` allows as many bytes; a longer
/// non-ASCII URL is refused there as 422 `invalid_url`).
pub const URL_MAX: usize = crate::adapters::events::webhook::MAX_URL_LEN;
/// Longest description, in characters.
pub const DESCRIPTION_MAX: usize = 500;
/// How many event types or patterns an endpoint lists.
pub const ENABLED_EVENTS_MIN: usize = 1;
pub const ENABLED_EVENTS_MAX: usize = 32;
/// How long a rotated-out secret keeps signing when the rotation does not say.
pub const PREVIOUS_VALID_FOR_DEFAULT: Duration = Duration::from_secs(24 * 3600);
/// The longest a rotated-out secret may keep signing.
pub const PREVIOUS_VALID_FOR_MAX: Duration = Duration::from_secs(7 * 24 * 3600);
/// Delivery states the log filters on.
const DELIVERY_STATES: [&str; 4] = ["pending", "failing", "delivered", "failed"];
const ENDPOINT_STATUSES: [&str; 2] = ["enabled", "disabled"];
/// The units of a duration (`crate::config::parse_duration`'s), with their length in ms.
const DURATION_UNITS: [(&str, u64); 6] = [
    ("ms", 1),
    ("s", 1000),
    ("", 1000),
    ("m", 60_000),
    ("h", 3_600_000),
    ("d", 86_400_000),
];

pub fn routes() -> OpenApiRouter<AppState> {
    OpenApiRouter::default()
        .routes(routes!(list, create))
        .routes(routes!(show, update, delete))
        .routes(routes!(rotate_secret))
        .routes(routes!(deliveries))
        .routes(routes!(replay))
}

// ---------------------------------------------------------------------------------------------
// Schemas

fn endpoint_url() -> Object {
    ObjectBuilder::new()
        .schema_type(Type::String)
        .min_length(Some(1))
        .max_length(Some(URL_MAX))
        .description(Some(
            "Where deliveries are POSTed: an absolute URL with the `http` or `https` scheme and a host, without \
             a user name or password. Redirects are not followed. A URL that cannot be called is 422 \
             `invalid_url`.",
        ))
        .examples(["https://hooks.example.com/orderflow"])
        .build()
}

fn enabled_events() -> Array {
    ArrayBuilder::new()
        .items(type_pattern(
            "An event type, `<prefix>.*` (e.g. `order.*`), or `*` for every type.",
        ))
        .min_items(Some(ENABLED_EVENTS_MIN))
        .max_items(Some(ENABLED_EVENTS_MAX))
        .description(Some("The events this endpoint receives."))
        .build()
}

fn enabled_events_default() -> Array {
    let mut schema = enabled_events();
    schema.description = Some("The events this endpoint receives (default: `[\"*\"]`, every event).".into());
    schema.default = Some(json!(["*"]));
    schema
}

fn description() -> Object {
    ObjectBuilder::new()
        .schema_type(Type::String)
        .max_length(Some(DESCRIPTION_MAX))
        .pattern(Some(OPTIONAL_TEXT_PATTERN))
        .description(Some("What the endpoint is for; surrounding white space is trimmed."))
        .build()
}

fn optional_description() -> Object {
    or_null(description())
}

fn endpoint_status() -> Object {
    ObjectBuilder::new()
        .schema_type(Type::String)
        .enum_values(Some(ENDPOINT_STATUSES))
        .description(Some(
            "`enabled` (receives deliveries) or `disabled` (by an operator, after a 410 Gone, or after failing \
             continuously for `--webhook-disable-after`): deliveries already queued wait for it to be \
             re-enabled; events that happen meanwhile are not queued for it (replay them).",
        ))
        .build()
}

fn delivery_state() -> Object {
    ObjectBuilder::new()
        .schema_type(Type::String)
        .enum_values(Some(DELIVERY_STATES))
        .description(Some(
            "`pending` (due, or waiting for a retry or the order's earlier events), `delivered` (a 2xx), or \
             `failed` (the retry schedule is exhausted; replayable).",
        ))
        .build()
}

fn secret() -> Object {
    ObjectBuilder::new()
        .schema_type(Type::String)
        .pattern(Some("^whsec_[A-Za-z0-9+/]+={0,2}$"))
        .description(Some(
            "The signing secret (Standard Webhooks): verify deliveries with it. Shown only when the endpoint is \
             created and when its secret is rotated; store it now.",
        ))
        .build()
}

/// Regular expression (no anchors) of the decimal numbers `0..=max`, without leading zeros.
fn up_to(max: u64) -> String {
    let digits: Vec<u8> = max.to_string().bytes().map(|b| b - b'0').collect();
    let class = |low: u8, high: u8| {
        if low == high {
            low.to_string()
        } else {
            format!("[{low}-{high}]")
        }
    };
    let n = digits.len();
    let mut alternatives = vec!["0".to_string()];
    if n >= 2 {
        alternatives.push(if n == 2 {
            "[1-9]".to_string()
        } else {
            format!("[1-9][0-9]{{0,{}}}", n - 2)
        });
    }
    let mut prefix = String::new();
    for (i, &digit) in digits.iter().enumerate() {
        let low = u8::from(i == 0);
        let rest = n - 1 - i;
        if rest == 0 {
            if digit >= low {
                alternatives.push(format!("{prefix}{}", class(low, digit)));
            }
        } else if digit > low {
            let tail = if rest == 1 {
                "[0-9]".to_string()
            } else {
                format!("[0-9]{{{rest}}}")
            };
            alternatives.push(format!("{prefix}{}{tail}", class(low, digit - 1)));
        }
        prefix.push(char::from(b'0' + digit));
    }
    alternatives.join("|")
}

/// `previous_valid_for` as the schema publishes it: a duration of at most
/// [`PREVIOUS_VALID_FOR_MAX`] in any unit [`parse_previous_valid_for`] takes.
pub fn previous_valid_for_pattern() -> String {
    let max_ms = PREVIOUS_VALID_FOR_MAX.as_millis() as u64;
    let units: Vec<String> = DURATION_UNITS
        .iter()
        .map(|(unit, ms)| format!("0*({}){unit}", up_to(max_ms / ms)))
        .collect();
    format!("^({})$", units.join("|"))
}

fn previous_valid_for() -> Object {
    ObjectBuilder::new()
        .schema_type(Type::String)
        .pattern(Some(previous_valid_for_pattern()))
        .default(Some(json!("24h")))
        .examples(["24h", "30m", "0"])
        .description(Some(format!(
            "How long the current secret keeps signing deliveries beside the new one (both signatures are \
             sent meanwhile): a whole number with a unit `ms`, `s` (the default unit), `m`, `h` or `d`, at \
             most {} days; `0` makes the old secret invalid at once.",
            PREVIOUS_VALID_FOR_MAX.as_secs() / 86_400
        )))
        .build()
}

/// Reads `previous_valid_for` like the command line reads durations
/// ([`crate::config::parse_duration`]), plus `0` (no grace), at most [`PREVIOUS_VALID_FOR_MAX`].
pub fn parse_previous_valid_for(text: &str) -> Result<Duration, String> {
    let syntax = || "must be a whole number with a unit (ms, s, m, h or d), e.g. 24h or 30m".to_string();
    let split = text.find(|c: char| !c.is_ascii_digit()).unwrap_or(text.len());
    let (number, unit) = text.split_at(split);
    if number.is_empty() || !DURATION_UNITS.iter().any(|(u, _)| *u == unit) {
        return Err(syntax());
    }
    let significant = number.trim_start_matches('0');
    let too_long = || format!("must be at most {}d", PREVIOUS_VALID_FOR_MAX.as_secs() / 86_400);
    if significant.is_empty() {
        return Ok(Duration::ZERO);
    }
    // Bounded before parsing so no unit can overflow.
    if significant.len() > 12 {
        return Err(too_long());
    }
    let duration = crate::config::parse_duration(&format!("{significant}{unit}")).map_err(|_| syntax())?;
    if duration > PREVIOUS_VALID_FOR_MAX {
        return Err(too_long());
    }
    Ok(duration)
}

// ---------------------------------------------------------------------------------------------
// Views

/// What is waiting and failing for one endpoint.
#[derive(Serialize, ToSchema)]
#[schema(as = WebhookEndpointHealth)]
struct HealthView {
    /// Deliveries not yet delivered (due, retrying, or waiting for their order's earlier events).
    pending: i64,
    /// Pending deliveries that have failed at least once.
    failing: i64,
    /// Deliveries whose retries are exhausted (replayable).
    failed: i64,
    /// Age of the oldest pending delivery.
    oldest_pending_age_seconds: Option<f64>,
    /// Since when every attempt has failed (cleared by a success or by re-enabling).
    failing_since: Option<DateTime<Utc>>,
}

impl From<EndpointHealth> for HealthView {
    fn from(health: EndpointHealth) -> Self {
        Self {
            pending: health.pending,
            failing: health.failing,
            failed: health.failed,
            oldest_pending_age_seconds: health.oldest_pending_age_seconds,
            failing_since: health.failing_since,
        }
    }
}

/// A webhook endpoint (never with its secret).
#[derive(Serialize, ToSchema)]
#[schema(as = WebhookEndpoint)]
struct EndpointView {
    endpoint_id: Uuid,
    #[schema(schema_with = endpoint_url)]
    url: String,
    #[schema(schema_with = enabled_events)]
    enabled_events: Vec<String>,
    description: Option<String>,
    #[schema(schema_with = endpoint_status)]
    status: &'static str,
    /// Why it is disabled; `null` while enabled.
    disabled_reason: Option<String>,
    /// After a rotation: until when the previous secret also signs deliveries.
    previous_secret_expires_at: Option<DateTime<Utc>>,
    created_at: DateTime<Utc>,
    updated_at: DateTime<Utc>,
    /// Its deliveries' state (in GET answers).
    #[serde(skip_serializing_if = "Option::is_none")]
    #[schema(nullable = false)]
    health: Option<HealthView>,
}

impl EndpointView {
    fn new(endpoint: WebhookEndpoint, health: Option<EndpointHealth>) -> Self {
        Self {
            endpoint_id: endpoint.id,
            url: endpoint.url,
            enabled_events: endpoint.enabled_events,
            description: endpoint.description,
            status: endpoint.status.as_str(),
            disabled_reason: endpoint.disabled_reason,
            previous_secret_expires_at: endpoint.previous_secret_expires_at,
            created_at: endpoint.created_at,
            updated_at: endpoint.updated_at,
            health: health.map(HealthView::from),
        }
    }
}

/// A new endpoint, with its secret (shown this once).
#[derive(Serialize, ToSchema)]
#[schema(as = CreatedWebhookEndpoint)]
struct CreatedView {
    #[serde(flatten)]
    endpoint: EndpointView,
    #[schema(schema_with = secret)]
    secret: String,
}

/// A page of endpoints, in creation order.
#[derive(Serialize, ToSchema)]
#[schema(as = WebhookEndpointList)]
struct EndpointList {
    data: Vec<EndpointView>,
    /// Pass as `cursor` to get the next page; `null` on the last page.
    next_cursor: Option<String>,
}

/// One attempt to deliver.
#[derive(Serialize, ToSchema)]
#[schema(as = WebhookAttempt)]
struct AttemptView {
    attempted_at: DateTime<Utc>,
    /// The endpoint's HTTP status; `null` when no answer came (timeout, refused, TLS).
    status_code: Option<i32>,
    /// From sending the request to the answer's status (or the failure).
    latency_ms: i64,
    error: Option<String>,
    /// The first bytes of the answer's body.
    response_excerpt: Option<String>,
}

/// One event's delivery to the endpoint, with every attempt.
#[derive(Serialize, ToSchema)]
#[schema(as = WebhookDelivery)]
struct DeliveryView {
    delivery_id: Uuid,
    /// The event id: the `webhook-id` header of every attempt.
    event_id: Uuid,
    event_type: String,
    subject: String,
    sequence: i64,
    position: i64,
    #[schema(schema_with = delivery_state)]
    state: String,
    /// Attempts so far.
    attempts: i32,
    /// When the next attempt is due (pending deliveries).
    next_attempt_at: Option<DateTime<Utc>>,
    last_status: Option<i32>,
    last_error: Option<String>,
    created_at: DateTime<Utc>,
    delivered_at: Option<DateTime<Utc>>,
    /// Every attempt, oldest first.
    attempt_log: Vec<AttemptView>,
}

impl From<DeliveryLog> for DeliveryView {
    fn from(log: DeliveryLog) -> Self {
        Self {
            delivery_id: log.delivery_id,
            event_id: log.event_id,
            event_type: log.event_type,
            subject: log.subject,
            sequence: log.sequence,
            position: log.position,
            state: log.state,
            attempts: log.attempts,
            next_attempt_at: log.next_attempt_at,
            last_status: log.last_status,
            last_error: log.last_error,
            created_at: log.created_at,
            delivered_at: log.delivered_at,
            attempt_log: log
                .attempt_log
                .into_iter()
                .map(|a| AttemptView {
                    attempted_at: a.attempted_at,
                    status_code: a.status_code,
                    latency_ms: a.latency_ms,
                    error: a.error,
                    response_excerpt: a.response_excerpt,
                })
                .collect(),
        }
    }
}

/// A page of deliveries, newest first.
#[derive(Serialize, ToSchema)]
#[schema(as = WebhookDeliveryList)]
struct DeliveryList {
    data: Vec<DeliveryView>,
    /// Pass as `cursor` to get the next page; `null` on the last page.
    next_cursor: Option<String>,
}

/// A rotation's new secret.
#[derive(Serialize, ToSchema)]
#[schema(as = RotatedWebhookSecret)]
struct RotatedView {
    #[schema(schema_with = secret)]
    secret: String,
    /// Until when the previous secret also signs deliveries (now, for `previous_valid_for: "0"`).
    previous_secret_expires_at: DateTime<Utc>,
}

/// How many deliveries a replay queued.
#[derive(Serialize, ToSchema)]
#[schema(as = QueuedDeliveries)]
struct Queued {
    queued: u64,
}

// ---------------------------------------------------------------------------------------------
// Bodies

/// `Some(None)` for an explicit `null`, `None` for an absent field.
fn nullable<'de, D: Deserializer<'de>, T: Deserialize<'de>>(deserializer: D) -> Result<Option<Option<T>>, D::Error> {
    Option::<T>::deserialize(deserializer).map(Some)
}

/// A new webhook endpoint.
#[derive(Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
#[schema(as = CreateWebhookEndpoint)]
struct CreateEndpoint {
    #[schema(schema_with = endpoint_url, required = true)]
    url: Option<String>,
    #[serde(default, deserialize_with = "nullable")]
    #[schema(schema_with = enabled_events_default)]
    enabled_events: Option<Option<Vec<String>>>,
    #[schema(schema_with = optional_description)]
    description: Option<String>,
}

/// Changes to an endpoint: any of its fields, at least one. `null` clears `description`.
/// Re-enabling (`status: enabled`) clears its failure clock; its waiting deliveries resume.
#[derive(Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
#[schema(as = UpdateWebhookEndpoint)]
struct UpdateEndpoint {
    #[serde(default, deserialize_with = "nullable")]
    #[schema(schema_with = endpoint_url)]
    url: Option<Option<String>>,
    #[serde(default, deserialize_with = "nullable")]
    #[schema(schema_with = enabled_events)]
    enabled_events: Option<Option<Vec<String>>>,
    #[serde(default, deserialize_with = "nullable")]
    #[schema(schema_with = optional_description)]
    description: Option<Option<String>>,
    #[serde(default, deserialize_with = "nullable")]
    #[schema(schema_with = endpoint_status)]
    status: Option<Option<String>>,
}

/// A secret rotation.
#[derive(Default, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
#[schema(as = RotateWebhookSecret)]
struct RotateSecret {
    #[serde(default, deserialize_with = "nullable")]
    #[schema(schema_with = previous_valid_for)]
    previous_valid_for: Option<Option<String>>,
}

/// Which events to send again: a time range or a position range, both ends given.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct ReplayBody {
    since: Option<String>,
    until: Option<String>,
    #[serde(default, deserialize_with = "optional_whole_number")]
    from_position: Option<i64>,
    #[serde(default, deserialize_with = "optional_whole_number")]
    to_position: Option<i64>,
}

fn date_time(description: &str) -> Object {
    ObjectBuilder::new()
        .schema_type(Type::String)
        .format(Some(SchemaFormat::KnownFormat(KnownFormat::DateTime)))
        .description(Some(description))
        .build()
}

fn replay_position(description: &str) -> Object {
    ObjectBuilder::new()
        .schema_type(Type::Integer)
        .format(Some(SchemaFormat::KnownFormat(KnownFormat::Int64)))
        .minimum(Some(0))
        .description(Some(description))
        .build()
}

impl PartialSchema for ReplayBody {
    fn schema() -> RefOr<Schema> {
        let times = ObjectBuilder::new()
            .title(Some("By time"))
            .property("since", date_time("Events created at or after this time."))
            .required("since")
            .property("until", date_time("Events created before this time (after `since`)."))
            .required("until")
            .additional_properties(Some(AdditionalProperties::FreeForm(false)))
            .build();
        let positions = ObjectBuilder::new()
            .title(Some("By position"))
            .property("from_position", replay_position("The first position."))
            .required("from_position")
            .property(
                "to_position",
                replay_position("The last position (at least `from_position`)."),
            )
            .required("to_position")
            .additional_properties(Some(AdditionalProperties::FreeForm(false)))
            .build();
        RefOr::T(Schema::OneOf(
            OneOfBuilder::new()
                .item(times)
                .item(positions)
                .description(Some(
                    "Either `since` and `until`, or `from_position` and `to_position`. A missing end, both \
                     ranges, or an empty range is 422 `invalid_replay_range`.",
                ))
                .build(),
        ))
    }
}

impl ToSchema for ReplayBody {
    fn name() -> Cow<'static, str> {
        Cow::Borrowed("ReplayWebhookDeliveries")
    }
}

// ---------------------------------------------------------------------------------------------
// Validation

fn required<T>(errors: &mut FieldErrors, field: &str, value: Option<T>) -> Option<T> {
    if value.is_none() {
        errors.add(field, "is required");
    }
    value
}

/// A field that may be left out but, when present, must not be `null`.
fn not_null<T>(errors: &mut FieldErrors, field: &str, value: Option<Option<T>>) -> Option<T> {
    match value {
        Some(None) => {
            errors.add(field, "must not be null; leave it out to keep the current value");
            None
        }
        Some(Some(value)) => Some(value),
        None => None,
    }
}

/// The published limit on a URL (its syntax is checked by [`checked_url`]).
fn url_length(errors: &mut FieldErrors, url: String) -> Option<String> {
    if url.chars().count() > URL_MAX {
        errors.add("/url", format!("must be at most {URL_MAX} characters"));
        return None;
    }
    Some(url)
}

/// 422 `invalid_url` when the service could not call it.
fn checked_url(url: &str) -> Result<String, ApiError> {
    validate_endpoint_url(url).map_err(|message| {
        ApiError::unprocessable("invalid_url", "Invalid endpoint URL", format!("/url: {message}"))
            .with_field("/url", message)
    })
}

fn patterns(errors: &mut FieldErrors, values: Vec<String>) -> Option<Vec<TypePattern>> {
    if !(ENABLED_EVENTS_MIN..=ENABLED_EVENTS_MAX).contains(&values.len()) {
        errors.add(
            "/enabled_events",
            format!("must list {ENABLED_EVENTS_MIN} to {ENABLED_EVENTS_MAX} event types or patterns"),
        );
        return None;
    }
    let before = errors.as_slice().len();
    let parsed: Vec<TypePattern> = values
        .iter()
        .enumerate()
        .filter_map(|(index, value)| errors.check(&format!("/enabled_events/{index}"), TypePattern::parse(value)))
        .collect();
    (errors.as_slice().len() == before).then_some(parsed)
}

/// Trimmed; empty means none.
fn parse_description(errors: &mut FieldErrors, value: &str) -> Option<Option<String>> {
    errors
        .check("/description", optional_text(value, DESCRIPTION_MAX))
        .map(|text| Some(text).filter(|t| !t.is_empty()))
}

async fn endpoint_or_404(state: &AppState, id: Uuid) -> Result<WebhookEndpoint, ApiError> {
    state
        .store
        .events()
        .get_endpoint(id)
        .await?
        .ok_or_else(|| ApiError::not_found("webhook endpoint"))
}

async fn health_of(state: &AppState, id: Uuid) -> Result<Option<EndpointHealth>, ApiError> {
    Ok(state
        .store
        .events()
        .endpoint_health(clock::now())
        .await?
        .into_iter()
        .find(|health| health.endpoint_id == id))
}

// ---------------------------------------------------------------------------------------------
// Handlers

/// Create a webhook endpoint
///
/// Admin only. Events matching `enabled_events` are POSTed to `url` from now on, signed with
/// the secret this answer shows (only here and on rotation).
#[utoipa::path(
    post,
    path = "/admin/webhook-endpoints",
    operation_id = "createWebhookEndpoint",
    tag = "webhooks",
    security(("bearer" = [])),
    request_body = CreateEndpoint,
    responses(
        (status = 201, description = "Created, with its secret.", body = CreatedView, headers(
            ("Location" = String, description = "`/admin/webhook-endpoints/{id}` of the new endpoint."),
            ("Cache-Control" = String, description = "`private, no-store`."),
        )),
        (status = 403, description = "Not an admin.", body = Problem, content_type = "application/problem+json"),
        (status = 422, description = "`invalid_url`: the URL cannot be called (scheme, host, credentials, length).", body = Problem, content_type = "application/problem+json"),
    ),
)]
async fn create(
    State(state): State<AppState>,
    Admin(admin): Admin,
    ApiJson(body): ApiJson<CreateEndpoint>,
) -> Result<Response, ApiError> {
    let mut errors = FieldErrors::new();
    let url = required(&mut errors, "/url", body.url).and_then(|url| url_length(&mut errors, url));
    let enabled_events = match body.enabled_events {
        None => Some(vec![TypePattern::parse("*").expect("`*` is a pattern")]),
        Some(None) => {
            errors.add("/enabled_events", "must not be null; leave it out for every event");
            None
        }
        Some(Some(values)) => patterns(&mut errors, values),
    };
    let description = match body.description {
        None => Some(None),
        Some(text) => parse_description(&mut errors, &text),
    };
    let (Some(url), Some(enabled_events), Some(description)) = (url, enabled_events, description) else {
        return Err(ApiError::validation(errors));
    };
    if !errors.is_empty() {
        return Err(ApiError::validation(errors));
    }
    let url = checked_url(&url)?;
    let secret = WebhookSecret::generate();
    let endpoint = state
        .store
        .events()
        .create_endpoint(
            &NewEndpoint {
                id: Uuid::now_v7(),
                url,
                description,
                enabled_events,
                secret: secret.as_str().to_string(),
            },
            clock::now(),
        )
        .await?;
    tracing::info!(endpoint_id = %endpoint.id, url = %endpoint.url, by = %admin.subject, "created a webhook endpoint");
    let location = format!("/admin/webhook-endpoints/{}", endpoint.id);
    Ok(private((
        StatusCode::CREATED,
        [(header::LOCATION, location)],
        Json(CreatedView {
            secret: secret.as_str().to_string(),
            endpoint: EndpointView::new(endpoint, None),
        }),
    )))
}

/// List webhook endpoints
///
/// Admin only. Every endpoint in creation order, each with its deliveries' health: pending,
/// failing, failed, the oldest pending one's age, since when it has been failing, and why it is
/// disabled.
#[utoipa::path(
    get,
    path = "/admin/webhook-endpoints",
    operation_id = "listWebhookEndpoints",
    tag = "webhooks",
    security(("bearer" = [])),
    params(super::extract::PageParams),
    responses(
        (status = 200, description = "A page of endpoints.", body = EndpointList, headers(
            ("Cache-Control" = String, description = "`private, no-store`."),
        )),
        (status = 403, description = "Not an admin.", body = Problem, content_type = "application/problem+json"),
    ),
)]
async fn list(State(state): State<AppState>, Admin(_): Admin, RawQuery(raw): RawQuery) -> Result<Response, ApiError> {
    let params = QueryParams::of::<super::extract::PageParams>(raw.as_deref())?;
    let after: Option<Uuid> = params.cursor()?;
    let limit = params.limit()? as usize;
    let events = state.store.events();
    let mut health = events.endpoint_health(clock::now()).await?;
    let mut page: Vec<WebhookEndpoint> = events
        .list_endpoints()
        .await?
        .into_iter()
        .filter(|endpoint| after.is_none_or(|after| endpoint.id > after))
        .take(limit + 1)
        .collect();
    let next_cursor = (page.len() > limit).then(|| page[limit - 1].id.simple().to_string());
    page.truncate(limit);
    let data = page
        .into_iter()
        .map(|endpoint| {
            let own = health
                .iter()
                .position(|h| h.endpoint_id == endpoint.id)
                .map(|at| health.swap_remove(at));
            EndpointView::new(endpoint, own)
        })
        .collect();
    Ok(private(Json(EndpointList { data, next_cursor })))
}

/// Get a webhook endpoint
///
/// Admin only. The endpoint and its deliveries' health; never its secret.
#[utoipa::path(
    get,
    path = "/admin/webhook-endpoints/{id}",
    operation_id = "getWebhookEndpoint",
    tag = "webhooks",
    security(("bearer" = [])),
    params(("id" = Uuid, Path, description = "The endpoint's id.")),
    responses(
        (status = 200, description = "The endpoint.", body = EndpointView, headers(
            ("Cache-Control" = String, description = "`private, no-store`."),
        )),
        (status = 403, description = "Not an admin.", body = Problem, content_type = "application/problem+json"),
        (status = 404, description = "No such endpoint.", body = Problem, content_type = "application/problem+json"),
    ),
)]
async fn show(State(state): State<AppState>, Admin(_): Admin, Path(id): Path<String>) -> Result<Response, ApiError> {
    let id: Uuid = path_id("id", &id)?;
    let endpoint = endpoint_or_404(&state, id).await?;
    let health = health_of(&state, id).await?;
    Ok(private(Json(EndpointView::new(endpoint, health))))
}

/// Update a webhook endpoint
///
/// Admin only. Changes its URL, events, description or status (`disabled` holds its
/// deliveries; `enabled` resumes them and clears its failure clock).
#[utoipa::path(
    patch,
    path = "/admin/webhook-endpoints/{id}",
    operation_id = "updateWebhookEndpoint",
    tag = "webhooks",
    security(("bearer" = [])),
    params(("id" = Uuid, Path, description = "The endpoint's id.")),
    request_body = UpdateEndpoint,
    responses(
        (status = 200, description = "The updated endpoint.", body = EndpointView, headers(
            ("Cache-Control" = String, description = "`private, no-store`."),
        )),
        (status = 403, description = "Not an admin.", body = Problem, content_type = "application/problem+json"),
        (status = 404, description = "No such endpoint.", body = Problem, content_type = "application/problem+json"),
        (status = 422, description = "`invalid_url`: the URL cannot be called.", body = Problem, content_type = "application/problem+json"),
    ),
)]
async fn update(
    State(state): State<AppState>,
    Admin(admin): Admin,
    Path(id): Path<String>,
    ApiJson(body): ApiJson<UpdateEndpoint>,
) -> Result<Response, ApiError> {
    let id: Uuid = path_id("id", &id)?;
    let mut errors = FieldErrors::new();
    let url = not_null(&mut errors, "/url", body.url).and_then(|url| url_length(&mut errors, url));
    let enabled_events =
        not_null(&mut errors, "/enabled_events", body.enabled_events).and_then(|values| patterns(&mut errors, values));
    let description = body.description.map(|value| match value {
        None => Some(None),
        Some(text) => parse_description(&mut errors, &text),
    });
    let status = not_null(&mut errors, "/status", body.status).and_then(|status| match status.as_str() {
        "enabled" => Some(EndpointStatus::Enabled),
        "disabled" => Some(EndpointStatus::Disabled),
        _ => {
            errors.add("/status", "must be enabled or disabled");
            None
        }
    });
    if !errors.is_empty() {
        return Err(ApiError::validation(errors));
    }
    let patch = EndpointPatch {
        url: url.as_deref().map(checked_url).transpose()?,
        description: description.flatten(),
        enabled_events,
        status,
    };
    if patch.url.is_none() && patch.description.is_none() && patch.enabled_events.is_none() && patch.status.is_none() {
        return Err(ApiError::invalid_field(
            "/",
            "name at least one of: url, enabled_events, description, status",
        ));
    }
    let endpoint = state
        .store
        .events()
        .update_endpoint(id, &patch, clock::now())
        .await?
        .ok_or_else(|| ApiError::not_found("webhook endpoint"))?;
    tracing::info!(
        endpoint_id = %id,
        endpoint_status = endpoint.status.as_str(),
        by = %admin.subject,
        "updated a webhook endpoint"
    );
    Ok(private(Json(EndpointView::new(endpoint, None))))
}

/// Delete a webhook endpoint
///
/// Admin only. Its deliveries and their log go with it; nothing more is sent to it.
#[utoipa::path(
    delete,
    path = "/admin/webhook-endpoints/{id}",
    operation_id = "deleteWebhookEndpoint",
    tag = "webhooks",
    security(("bearer" = [])),
    params(("id" = Uuid, Path, description = "The endpoint's id.")),
    responses(
        (status = 204, description = "Deleted."),
        (status = 403, description = "Not an admin.", body = Problem, content_type = "application/problem+json"),
        (status = 404, description = "No such endpoint.", body = Problem, content_type = "application/problem+json"),
    ),
)]
async fn delete(
    State(state): State<AppState>,
    Admin(admin): Admin,
    Path(id): Path<String>,
) -> Result<Response, ApiError> {
    let id: Uuid = path_id("id", &id)?;
    if !state.store.events().delete_endpoint(id).await? {
        return Err(ApiError::not_found("webhook endpoint"));
    }
    tracing::info!(endpoint_id = %id, by = %admin.subject, "deleted a webhook endpoint");
    Ok(private(StatusCode::NO_CONTENT))
}

/// Rotate a webhook endpoint's secret
///
/// Admin only. A new secret signs deliveries from now on; the current one also signs them for
/// `previous_valid_for` (default 24h, at most 7d; `0` ends it at once), so receivers can switch
/// without missing a delivery. The body may be left out.
#[utoipa::path(
    post,
    path = "/admin/webhook-endpoints/{id}/rotate-secret",
    operation_id = "rotateWebhookEndpointSecret",
    tag = "webhooks",
    security(("bearer" = [])),
    params(("id" = Uuid, Path, description = "The endpoint's id.")),
    request_body(content = Option<RotateSecret>, description = "Optional: without a body the previous secret stays valid for 24h.", content_type = "application/json"),
    responses(
        (status = 200, description = "The new secret (shown only here).", body = RotatedView, headers(
            ("Cache-Control" = String, description = "`private, no-store`."),
        )),
        (status = 403, description = "Not an admin.", body = Problem, content_type = "application/problem+json"),
        (status = 404, description = "No such endpoint.", body = Problem, content_type = "application/problem+json"),
    ),
)]
async fn rotate_secret(
    State(state): State<AppState>,
    Admin(admin): Admin,
    Path(id): Path<String>,
    request: Request,
) -> Result<Response, ApiError> {
    let id: Uuid = path_id("id", &id)?;
    let headers = request.headers();
    let no_body = !headers.contains_key(header::CONTENT_TYPE)
        && !headers.contains_key(header::TRANSFER_ENCODING)
        && headers
            .get(header::CONTENT_LENGTH)
            .is_none_or(|length| length.as_bytes() == b"0");
    let body = if no_body {
        RotateSecret::default()
    } else {
        // `null` is the empty body's JSON spelling (the schema's `Option`).
        ApiJson::<Option<RotateSecret>>::from_request(request, &state)
            .await?
            .0
            .unwrap_or_default()
    };
    let grace = match body.previous_valid_for {
        None => PREVIOUS_VALID_FOR_DEFAULT,
        Some(None) => {
            return Err(ApiError::invalid_field(
                "/previous_valid_for",
                "must not be null; leave it out for the default of 24h",
            ));
        }
        Some(Some(text)) => parse_previous_valid_for(&text)
            .map_err(|message| ApiError::invalid_field("/previous_valid_for", message))?,
    };
    let now = clock::now();
    let until = now + chrono::Duration::from_std(grace).expect("bounded by PREVIOUS_VALID_FOR_MAX");
    let secret = WebhookSecret::generate();
    let endpoint = state
        .store
        .events()
        .rotate_secret(id, secret.as_str(), until, now)
        .await?
        .ok_or_else(|| ApiError::not_found("webhook endpoint"))?;
    tracing::info!(endpoint_id = %id, previous_valid_until = %until, by = %admin.subject, "rotated a webhook secret");
    Ok(private(Json(RotatedView {
        secret: secret.as_str().to_string(),
        previous_secret_expires_at: endpoint.previous_secret_expires_at.unwrap_or(until),
    })))
}

/// The query of GET /admin/webhook-endpoints/{id}/deliveries.
struct DeliveryListParams;

impl IntoParams for DeliveryListParams {
    fn into_params(_: impl Fn() -> Option<ParameterIn>) -> Vec<Parameter> {
        vec![
            parameter(
                "state",
                ParameterIn::Query,
                false,
                "Only deliveries in this state.",
                delivery_state(),
            ),
            limit_parameter(),
            cursor_parameter(),
        ]
    }
}

/// List an endpoint's deliveries
///
/// Admin only. The delivery log, newest first: each event's delivery with every attempt (time,
/// status code, latency, error, the first bytes of the answer).
#[utoipa::path(
    get,
    path = "/admin/webhook-endpoints/{id}/deliveries",
    operation_id = "listWebhookDeliveries",
    tag = "webhooks",
    security(("bearer" = [])),
    params(("id" = Uuid, Path, description = "The endpoint's id."), DeliveryListParams),
    responses(
        (status = 200, description = "A page of deliveries, newest first.", body = DeliveryList, headers(
            ("Cache-Control" = String, description = "`private, no-store`."),
        )),
        (status = 403, description = "Not an admin.", body = Problem, content_type = "application/problem+json"),
        (status = 404, description = "No such endpoint.", body = Problem, content_type = "application/problem+json"),
    ),
)]
async fn deliveries(
    State(state): State<AppState>,
    Admin(_): Admin,
    Path(id): Path<String>,
    RawQuery(raw): RawQuery,
) -> Result<Response, ApiError> {
    let id: Uuid = path_id("id", &id)?;
    let params = QueryParams::of::<DeliveryListParams>(raw.as_deref())?;
    let delivery_state = params
        .get("state")
        .map(|s| {
            DELIVERY_STATES
                .iter()
                .find(|known| **known == s)
                .copied()
                .ok_or_else(|| {
                    ApiError::invalid_field("query.state", format!("must be one of: {}", DELIVERY_STATES.join(", ")))
                })
        })
        .transpose()?;
    let before: Option<Uuid> = params.cursor()?;
    let limit = params.limit()?;
    endpoint_or_404(&state, id).await?;
    let page = state
        .store
        .events()
        .list_deliveries(id, delivery_state, before, limit)
        .await?;
    Ok(private(Json(DeliveryList {
        data: page.items.into_iter().map(DeliveryView::from).collect(),
        next_cursor: page.next_after.map(|id| id.simple().to_string()),
    })))
}

fn invalid_range(detail: &str, fields: &[(&str, &str)]) -> ApiError {
    fields.iter().fold(
        ApiError::unprocessable("invalid_replay_range", "Invalid replay range", detail),
        |error, (field, message)| error.with_field(*field, *message),
    )
}

/// Reads the replay body: type errors are 400; a missing end, both ranges or an empty range 422.
fn replay_range(body: ReplayBody) -> Result<ReplayRange, ApiError> {
    let mut errors = FieldErrors::new();
    let mut time = |field: &str, value: Option<String>| {
        value.and_then(|text| {
            errors.check(
                field,
                DateTime::parse_from_rfc3339(&text)
                    .map(|at| at.with_timezone(&Utc))
                    .map_err(|_| "must be an RFC 3339 date-time, e.g. 2026-12-01T00:00:00Z".to_string()),
            )
        })
    };
    let since = time("/since", body.since.clone());
    let until = time("/until", body.until.clone());
    for (field, value) in [
        ("/from_position", body.from_position),
        ("/to_position", body.to_position),
    ] {
        if value.is_some_and(|n| n < 0) {
            errors.add(field, "must be at least 0");
        }
    }
    if !errors.is_empty() {
        return Err(ApiError::validation(errors));
    }
    let by_time = body.since.is_some() || body.until.is_some();
    let by_position = body.from_position.is_some() || body.to_position.is_some();
    match (since, until, body.from_position, body.to_position) {
        _ if by_time && by_position => {
            let given: Vec<(&str, &str)> = [
                ("/since", body.since.is_some()),
                ("/until", body.until.is_some()),
                ("/from_position", body.from_position.is_some()),
                ("/to_position", body.to_position.is_some()),
            ]
            .into_iter()
            .filter(|(_, given)| *given)
            .map(|(field, _)| (field, "give one range: times or positions"))
            .collect();
            Err(invalid_range(
                "give either since and until, or from_position and to_position, not both",
                &given,
            ))
        }
        (Some(since), Some(until), None, None) if since < until => Ok(ReplayRange::Time { since, until }),
        (Some(_), Some(_), None, None) => Err(invalid_range(
            "since must be before until",
            &[("/until", "must be after since")],
        )),
        (None, None, Some(from), Some(to)) if from <= to => Ok(ReplayRange::Positions { from, to }),
        (None, None, Some(_), Some(_)) => Err(invalid_range(
            "from_position must not be after to_position",
            &[("/to_position", "must be at least from_position")],
        )),
        (Some(_), None, ..) => Err(invalid_range(
            "a time range needs both ends",
            &[("/until", "is required with since")],
        )),
        (None, Some(_), ..) => Err(invalid_range(
            "a time range needs both ends",
            &[("/since", "is required with until")],
        )),
        (_, _, Some(_), None) => Err(invalid_range(
            "a position range needs both ends",
            &[("/to_position", "is required with from_position")],
        )),
        (_, _, None, Some(_)) => Err(invalid_range(
            "a position range needs both ends",
            &[("/from_position", "is required with to_position")],
        )),
        _ => Err(invalid_range(
            "give since and until, or from_position and to_position",
            &[
                ("/since", "is required (or give a position range)"),
                ("/until", "is required (or give a position range)"),
                ("/from_position", "is required (or give a time range)"),
                ("/to_position", "is required (or give a time range)"),
            ],
        )),
    }
}

/// Replay events to an endpoint
///
/// Admin only. Queues the endpoint's events in a time range (`since` ≤ created < `until`) or a
/// position range (`from_position` ≤ position ≤ `to_position`) again: the same events with the
/// same ids, filtered by the endpoint's `enabled_events`, delivered in each order's sequence.
#[utoipa::path(
    post,
    path = "/admin/webhook-endpoints/{id}/replay",
    operation_id = "replayWebhookDeliveries",
    tag = "webhooks",
    security(("bearer" = [])),
    params(("id" = Uuid, Path, description = "The endpoint's id.")),
    request_body = ReplayBody,
    responses(
        (status = 202, description = "Queued.", body = Queued, headers(
            ("Cache-Control" = String, description = "`private, no-store`."),
        )),
        (status = 403, description = "Not an admin.", body = Problem, content_type = "application/problem+json"),
        (status = 404, description = "No such endpoint.", body = Problem, content_type = "application/problem+json"),
        (status = 422, description = "`invalid_replay_range`: not exactly one range with both ends, or an empty range; `errors` names the fields.", body = Problem, content_type = "application/problem+json"),
    ),
)]
async fn replay(
    State(state): State<AppState>,
    Admin(admin): Admin,
    Path(id): Path<String>,
    ApiJson(body): ApiJson<ReplayBody>,
) -> Result<Response, ApiError> {
    let id: Uuid = path_id("id", &id)?;
    let range = replay_range(body)?;
    endpoint_or_404(&state, id).await?;
    // In its own task: a large range commits chunk by chunk, and a client that gives up (or the
    // handler timeout) must not cut it off halfway. A retry only queues the same ids again.
    let store = state.store.clone();
    let queued = tokio::spawn(async move { store.events().replay_deliveries(id, range, clock::now()).await })
        .await
        .map_err(|error| crate::store::StoreError::Corrupt(format!("the replay task failed: {error}")))??;
    tracing::info!(endpoint_id = %id, queued, range = ?range, by = %admin.subject, "replayed events to a webhook endpoint");
    Ok(private((StatusCode::ACCEPTED, Json(Queued { queued }))))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn number_ranges_as_regular_expressions() {
        assert_eq!(up_to(7), "0|[1-7]");
        assert_eq!(up_to(168), "0|[1-9][0-9]{0,1}|1[0-5][0-9]|16[0-8]");
        assert_eq!(up_to(10), "0|[1-9]|10");
    }

    #[test]
    fn previous_valid_for_is_read_like_the_command_line() {
        let ok = |text: &str| parse_previous_valid_for(text).unwrap();
        assert_eq!(ok("24h"), Duration::from_secs(86_400));
        assert_eq!(ok("90"), Duration::from_secs(90));
        assert_eq!(ok("1500ms"), Duration::from_millis(1500));
        assert_eq!(ok("7d"), PREVIOUS_VALID_FOR_MAX);
        assert_eq!(ok("168h"), PREVIOUS_VALID_FOR_MAX);
        assert_eq!(ok("0"), Duration::ZERO);
        assert_eq!(ok("0s"), Duration::ZERO);
        assert_eq!(ok("007d"), PREVIOUS_VALID_FOR_MAX);
        for bad in [
            "",
            "h",
            "8d",
            "169h",
            "604801s",
            "604800001ms",
            " 1h",
            "1h ",
            "1w",
            "-1h",
            "1.5h",
            "99999999999999999999d",
        ] {
            assert!(parse_previous_valid_for(bad).is_err(), "{bad:?}");
        }
        let pattern = previous_valid_for_pattern();
        assert!(pattern.starts_with("^(0*(") && pattern.ends_with("d)$"), "{pattern}");
    }

    #[test]
    fn event_patterns_are_bounded_like_the_schema() {
        let mut errors = FieldErrors::new();
        assert!(patterns(&mut errors, vec![]).is_none());
        assert!(patterns(&mut errors, vec!["order.*".into(); ENABLED_EVENTS_MAX + 1]).is_none());
        let mut errors = FieldErrors::new();
        assert!(patterns(&mut errors, vec!["order.*".into(), "nope".into()]).is_none());
        assert_eq!(errors.as_slice()[0].field, "/enabled_events/1");
    }
}
