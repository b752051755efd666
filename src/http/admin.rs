//! Operator routes: queue health, dead-lettered jobs and their replay (admin only).

use axum::extract::{Path, RawQuery, State};
use axum::response::Response;
use axum::routing::{get, post};
use axum::{Json, Router};
use serde::Serialize;
use serde_json::json;
use uuid::Uuid;

use super::auth::Admin;
use super::error::ApiError;
use super::extract::{QueryParams, path_id};
use super::{AppState, private};
use crate::clock;
use crate::store::jobs::{JobFilter, JobRecord, QueueStats, ReplaySelector};
use crate::workflow::ALL_STEPS;

pub fn routes() -> Router<AppState> {
    Router::new()
        .route("/admin/queues", get(queues))
        .route("/admin/jobs", get(jobs))
        .route("/admin/jobs/replay", post(replay_all))
        .route("/admin/jobs/{id}/replay", post(replay_one))
}

const STATES: [&str; 4] = ["ready", "running", "succeeded", "dead"];

/// Every step kind appears, even one that never ran, so dashboards see a zero, not a gap.
async fn queues(State(state): State<AppState>, Admin(_): Admin) -> Result<Response, ApiError> {
    let mut stats = state.store.queue_stats(clock::now()).await?;
    for kind in ALL_STEPS {
        if !stats.iter().any(|s| s.kind == kind) {
            stats.push(QueueStats {
                kind: kind.to_string(),
                ..Default::default()
            });
        }
    }
    stats.sort_by(|a, b| a.kind.cmp(&b.kind));
    Ok(private(Json(json!({ "data": stats }))))
}

#[derive(Serialize)]
struct JobList {
    data: Vec<JobRecord>,
    next_cursor: Option<String>,
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

async fn jobs(State(state): State<AppState>, Admin(_): Admin, RawQuery(raw): RawQuery) -> Result<Response, ApiError> {
    let params = QueryParams::parse(raw.as_deref(), &["state", "kind", "limit", "cursor"])?;
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
        data: page.items,
        next_cursor: page.next_after.map(|id| id.simple().to_string()),
    })))
}

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
    Ok(private(Json(json!({ "replayed": replayed }))))
}

async fn replay_all(
    State(state): State<AppState>,
    Admin(admin): Admin,
    RawQuery(raw): RawQuery,
) -> Result<Response, ApiError> {
    let params = QueryParams::parse(raw.as_deref(), &["kind"])?;
    let kind = kind_param(&params)?;
    let replayed = state
        .store
        .replay_jobs(&ReplaySelector::AllDead { kind: kind.clone() }, clock::now())
        .await?;
    tracing::info!(replayed, kind = ?kind, by = %admin.subject, "replayed dead jobs");
    Ok(private(Json(json!({ "replayed": replayed }))))
}
