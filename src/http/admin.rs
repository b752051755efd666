//! Operator routes: queue health, dead-lettered jobs and their replay, every order (admin only).

use axum::Json;
use axum::extract::{Path, RawQuery, State};
use axum::response::Response;
use chrono::{DateTime, Utc};
use serde::Serialize;
use utoipa::openapi::path::{Parameter, ParameterIn};
use utoipa::openapi::schema::{Object, ObjectBuilder, Type};
use utoipa::{IntoParams, ToSchema};
use utoipa_axum::router::OpenApiRouter;
use utoipa_axum::routes;
use uuid::Uuid;

use super::auth::Admin;
use super::customers::OrderList;
use super::error::{ApiError, Problem};
use super::extract::{QueryParams, cursor_parameter, limit_parameter, parameter, path_id};
use super::orders::OrderView;
use super::{AppState, private};
use crate::clock;
use crate::domain::{OrderId, OrderStatus};
use crate::store::OrderQuery;
use crate::store::jobs::{JobError, JobFilter, JobRecord, QueueStats, ReplaySelector};
use crate::workflow::ALL_STEPS;

pub fn routes() -> OpenApiRouter<AppState> {
    OpenApiRouter::default()
        .routes(routes!(queues))
        .routes(routes!(jobs))
        .routes(routes!(replay_all))
        .routes(routes!(replay_one))
        .routes(routes!(orders))
}

const STATES: [&str; 4] = ["ready", "running", "succeeded", "dead"];

fn job_state() -> Object {
    ObjectBuilder::new()
        .schema_type(Type::String)
        .enum_values(Some(STATES))
        .description(Some(
            "`ready` (to run now or at `run_at`), `running`, `succeeded`, or `dead` (parked).",
        ))
        .build()
}

fn job_kind() -> Object {
    ObjectBuilder::new()
        .schema_type(Type::String)
        .enum_values(Some(ALL_STEPS))
        .description(Some("The pipeline step."))
        .build()
}

/// The numbers an operator watches for one step kind.
#[derive(Serialize, ToSchema)]
struct QueueView {
    #[schema(schema_with = job_kind)]
    kind: String,
    /// Ready to run now or waiting for a retry.
    ready: i64,
    running: i64,
    /// Parked after exhausting their attempts, until replayed.
    dead: i64,
    succeeded: i64,
    /// Seconds since the oldest ready job became ready (retries do not reset it).
    oldest_ready_age_seconds: Option<f64>,
}

impl QueueView {
    fn new(stats: QueueStats, succeeded: i64) -> Self {
        Self {
            kind: stats.kind,
            ready: stats.ready,
            running: stats.running,
            dead: stats.dead,
            succeeded,
            oldest_ready_age_seconds: stats.oldest_ready_age_seconds,
        }
    }
}

/// Every step kind, in name order.
#[derive(Serialize, ToSchema)]
struct QueueList {
    data: Vec<QueueView>,
}

/// One failed attempt of a job.
#[derive(Serialize, ToSchema)]
#[schema(as = JobAttemptError)]
struct JobErrorView {
    attempt: u32,
    error: String,
    at: DateTime<Utc>,
}

/// A job of the order pipeline.
#[derive(Serialize, ToSchema)]
#[schema(as = Job)]
struct JobView {
    job_id: Uuid,
    #[schema(schema_with = job_kind)]
    kind: String,
    order_id: Option<Uuid>,
    #[schema(schema_with = job_state)]
    state: String,
    attempts: i32,
    max_attempts: i32,
    last_error: Option<String>,
    /// Every failed attempt, oldest first.
    errors: Vec<JobErrorView>,
    /// When it runs (next).
    run_at: DateTime<Utc>,
    correlation_id: Option<String>,
    created_at: DateTime<Utc>,
    updated_at: DateTime<Utc>,
}

impl From<JobRecord> for JobView {
    fn from(job: JobRecord) -> Self {
        Self {
            job_id: job.job_id,
            kind: job.kind,
            order_id: job.order_id,
            state: job.state,
            attempts: job.attempts,
            max_attempts: job.max_attempts,
            last_error: job.last_error,
            errors: job
                .errors
                .into_iter()
                .map(|JobError { attempt, error, at }| JobErrorView { attempt, error, at })
                .collect(),
            run_at: job.run_at,
            correlation_id: job.correlation_id,
            created_at: job.created_at,
            updated_at: job.updated_at,
        }
    }
}

/// How many dead jobs went back to ready.
#[derive(Serialize, ToSchema)]
struct Replayed {
    replayed: u64,
}

/// Queue health
///
/// Admin only. Per step: ready, running, dead and succeeded jobs and the age of the oldest ready
/// one. Every step kind appears, even one that never ran, so dashboards see a zero, not a gap.
#[utoipa::path(
    get,
    path = "/admin/queues",
    operation_id = "getQueues",
    tag = "admin",
    security(("bearer" = [])),
    responses(
        (status = 200, description = "Per-step numbers.", body = QueueList),
        (status = 403, description = "Not an admin.", body = Problem, content_type = "application/problem+json"),
    ),
)]
async fn queues(State(state): State<AppState>, Admin(_): Admin) -> Result<Response, ApiError> {
    let mut stats = state.store.queue_stats(clock::now()).await?;
    let succeeded = state.store.succeeded_jobs().await?;
    let finished_only = succeeded.iter().map(|(kind, _)| kind.as_str());
    for kind in ALL_STEPS.into_iter().chain(finished_only) {
        if !stats.iter().any(|s| s.kind == kind) {
            stats.push(QueueStats {
                kind: kind.to_string(),
                ..Default::default()
            });
        }
    }
    stats.sort_by(|a, b| a.kind.cmp(&b.kind));
    Ok(private(Json(QueueList {
        data: stats
            .into_iter()
            .map(|stats| {
                let done = succeeded
                    .iter()
                    .find(|(kind, _)| *kind == stats.kind)
                    .map_or(0, |(_, n)| *n);
                QueueView::new(stats, done)
            })
            .collect(),
    })))
}

/// A page of jobs, oldest first.
#[derive(Serialize, ToSchema)]
struct JobList {
    data: Vec<JobView>,
    /// Pass as `cursor` to get the next page; `null` on the last page.
    next_cursor: Option<String>,
}

/// The query of GET /admin/jobs.
struct JobListParams;

impl IntoParams for JobListParams {
    fn into_params(_: impl Fn() -> Option<ParameterIn>) -> Vec<Parameter> {
        vec![
            parameter(
                "state",
                ParameterIn::Query,
                false,
                "Only jobs in this state.",
                job_state(),
            ),
            parameter("kind", ParameterIn::Query, false, "Only jobs of this step.", job_kind()),
            limit_parameter(),
            cursor_parameter(),
        ]
    }
}

/// The query of POST /admin/jobs/replay.
struct ReplayParams;

impl IntoParams for ReplayParams {
    fn into_params(_: impl Fn() -> Option<ParameterIn>) -> Vec<Parameter> {
        vec![parameter(
            "kind",
            ParameterIn::Query,
            false,
            "Only dead jobs of this step (default: every dead job).",
            job_kind(),
        )]
    }
}

fn kind_param(params: &QueryParams) -> Result<Option<String>, ApiError> {
    params
        .get("kind")
        .map(|kind| {
            ALL_STEPS
                .iter()
                .find(|k| **k == kind)
                .map(|k| k.to_string())
                .ok_or_else(|| {
                    ApiError::invalid_field("query.kind", format!("must be one of: {}", ALL_STEPS.join(", ")))
                })
        })
        .transpose()
}

/// List jobs
///
/// Admin only. Jobs with their attempts, last error and full error history; `state=dead` lists
/// the dead-lettered ones.
#[utoipa::path(
    get,
    path = "/admin/jobs",
    operation_id = "listJobs",
    tag = "admin",
    security(("bearer" = [])),
    params(JobListParams),
    responses(
        (status = 200, description = "A page of jobs.", body = JobList),
        (status = 403, description = "Not an admin.", body = Problem, content_type = "application/problem+json"),
    ),
)]
async fn jobs(State(state): State<AppState>, Admin(_): Admin, RawQuery(raw): RawQuery) -> Result<Response, ApiError> {
    let params = QueryParams::of::<JobListParams>(raw.as_deref())?;
    let job_state = params
        .get("state")
        .map(|s| {
            STATES
                .iter()
                .find(|known| **known == s)
                .map(|k| k.to_string())
                .ok_or_else(|| ApiError::invalid_field("query.state", format!("must be one of: {}", STATES.join(", "))))
        })
        .transpose()?;
    let filter = JobFilter {
        state: job_state,
        kind: kind_param(&params)?,
        after: params.cursor()?,
        limit: params.limit()?,
    };
    let page = state.store.list_jobs(&filter).await?;
    Ok(private(Json(JobList {
        data: page.items.into_iter().map(JobView::from).collect(),
        next_cursor: page.next_after.map(|id| id.simple().to_string()),
    })))
}

/// Replay a dead job
///
/// Admin only. Moves one dead job back to ready, keeping its history.
#[utoipa::path(
    post,
    path = "/admin/jobs/{id}/replay",
    operation_id = "replayJob",
    tag = "admin",
    security(("bearer" = [])),
    params(("id" = Uuid, Path, description = "The job's id.")),
    responses(
        (status = 200, description = "Replayed.", body = Replayed),
        (status = 403, description = "Not an admin.", body = Problem, content_type = "application/problem+json"),
        (status = 404, description = "No such job, or it is not dead.", body = Problem, content_type = "application/problem+json"),
    ),
)]
async fn replay_one(
    State(state): State<AppState>,
    Admin(admin): Admin,
    Path(id): Path<String>,
) -> Result<Response, ApiError> {
    let id: Uuid = path_id("id", &id)?;
    let replayed = state.store.replay_jobs(&ReplaySelector::One(id), clock::now()).await?;
    if replayed == 0 {
        return Err(ApiError::not_found("dead job"));
    }
    tracing::info!(job_id = %id, by = %admin.subject, "replayed a dead job");
    Ok(private(Json(Replayed { replayed })))
}

/// Replay dead jobs
///
/// Admin only. Moves every dead job (of a kind) back to ready, keeping their history.
#[utoipa::path(
    post,
    path = "/admin/jobs/replay",
    operation_id = "replayDeadJobs",
    tag = "admin",
    security(("bearer" = [])),
    params(ReplayParams),
    responses(
        (status = 200, description = "How many were replayed.", body = Replayed),
        (status = 403, description = "Not an admin.", body = Problem, content_type = "application/problem+json"),
    ),
)]
async fn replay_all(
    State(state): State<AppState>,
    Admin(admin): Admin,
    RawQuery(raw): RawQuery,
) -> Result<Response, ApiError> {
    let params = QueryParams::of::<ReplayParams>(raw.as_deref())?;
    let kind = kind_param(&params)?;
    let replayed = state
        .store
        .replay_jobs(&ReplaySelector::AllDead { kind: kind.clone() }, clock::now())
        .await?;
    tracing::info!(replayed, kind = ?kind, by = %admin.subject, "replayed dead jobs");
    Ok(private(Json(Replayed { replayed })))
}

fn order_status() -> Object {
    ObjectBuilder::new()
        .schema_type(Type::String)
        .enum_values(Some(OrderStatus::ALL.map(OrderStatus::as_str)))
        .description(Some("The order's status."))
        .build()
}

/// The query of GET /admin/orders.
struct OrderListParams;

impl IntoParams for OrderListParams {
    fn into_params(_: impl Fn() -> Option<ParameterIn>) -> Vec<Parameter> {
        vec![
            parameter(
                "status",
                ParameterIn::Query,
                false,
                "Only orders in this status.",
                order_status(),
            ),
            limit_parameter(),
            cursor_parameter(),
        ]
    }
}

/// List every order
///
/// Admin only. Every customer's orders, newest first, optionally of one status: the ops
/// dashboard's recent orders.
#[utoipa::path(
    get,
    path = "/admin/orders",
    operation_id = "listAllOrders",
    tag = "admin",
    security(("bearer" = [])),
    params(OrderListParams),
    responses(
        (status = 200, description = "A page of orders, newest first.", body = OrderList, headers(
            ("Cache-Control" = String, description = "`private, no-store`."),
        )),
        (status = 403, description = "Not an admin.", body = Problem, content_type = "application/problem+json"),
    ),
)]
async fn orders(State(state): State<AppState>, Admin(_): Admin, RawQuery(raw): RawQuery) -> Result<Response, ApiError> {
    let params = QueryParams::of::<OrderListParams>(raw.as_deref())?;
    let status = params
        .get("status")
        .map(|s| {
            s.parse::<OrderStatus>().map_err(|_| {
                let known: Vec<&str> = OrderStatus::ALL.iter().map(|s| s.as_str()).collect();
                ApiError::invalid_field("query.status", format!("must be one of: {}", known.join(", ")))
            })
        })
        .transpose()?;
    let before: Option<OrderId> = params.cursor()?;
    let page = state
        .store
        .list_orders(&OrderQuery {
            customer: None,
            status,
            before,
            limit: params.limit()?,
        })
        .await?;
    Ok(private(Json(OrderList {
        data: page
            .items
            .into_iter()
            .map(|order| OrderView::new(order, None))
            .collect(),
        next_cursor: page.next_after.map(|id| id.simple().to_string()),
    })))
}
