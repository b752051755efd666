//! Liveness (the process answers) and readiness (its database answers) probes.
//!
//! Readiness answers within [`READY_TIMEOUT`] even while the database is away: a connection
//! attempt to a stopped server waits for the whole acquire timeout, and a probe that hangs is
//! read as a dead process rather than an unready one.
//!
//! Readiness checks reads. A database that answers but takes no writes (its disk full, or
//! read-only) keeps the instance ready: reads still work there, every instance shares the same
//! database (or, embedded, there is only one), so taking it out of rotation would only turn
//! working reads into failures; writes answer 503 `storage_full` / `database_read_only` and the
//! condition ends by itself when an operator frees space (docs/operations.md).

use std::time::Duration;

use axum::Json;
use axum::extract::State;
use axum::http::StatusCode;
use axum::response::IntoResponse;
use serde::Serialize;
use utoipa::ToSchema;
use utoipa_axum::router::OpenApiRouter;
use utoipa_axum::routes;

use super::AppState;
use crate::store::{Backend, StoreError};

/// Longest the readiness probe waits for the database before answering 503.
const READY_TIMEOUT: Duration = Duration::from_secs(2);

pub fn routes() -> OpenApiRouter<AppState> {
    OpenApiRouter::default().routes(routes!(live)).routes(routes!(ready))
}

/// `ok` or `unavailable`.
#[derive(Clone, Copy, Serialize, ToSchema)]
#[serde(rename_all = "snake_case")]
enum Status {
    Ok,
    Unavailable,
}

/// The process answers.
#[derive(Serialize, ToSchema)]
struct Liveness {
    status: Status,
}

/// Whether the service can do its work, and the state of what it depends on.
#[derive(Serialize, ToSchema)]
struct Readiness {
    status: Status,
    components: Components,
    /// Alarms firing now (they never make the instance unready: restarting it would not help).
    alarms: Vec<FiringAlarm>,
}

/// An alarm that is firing; see `docs/operations.md` for what to do.
#[derive(Serialize, ToSchema)]
struct FiringAlarm {
    /// e.g. `oldest_job_age`, `dead_jobs`, `step_error_rate`, `orders_stuck_unpaid`.
    alarm: String,
    /// The step it is about, for per-step alarms.
    step: Option<String>,
    /// When it started firing.
    since: chrono::DateTime<chrono::Utc>,
}

#[derive(Serialize, ToSchema)]
struct Components {
    database: Database,
    /// The read replica (`--read-database-url`), when one is configured. Never makes the
    /// instance unready: while it is bypassed the primary serves its reads.
    #[serde(skip_serializing_if = "Option::is_none")]
    #[schema(nullable = false)]
    read_replica: Option<ReadReplica>,
}

/// The read replica as this process sees it.
#[derive(Serialize, ToSchema)]
struct ReadReplica {
    /// `in_use` (serving listings, reports and the audit), `lagging` or `down` (bypassed: the
    /// primary serves them), `starting` (not checked yet).
    #[schema(schema_with = replica_state)]
    state: &'static str,
    /// How far behind the primary the last check found it; `null` while down.
    lag_seconds: Option<f64>,
    /// `--read-replica-max-lag`.
    max_lag_seconds: f64,
}

fn replica_state() -> utoipa::openapi::schema::Object {
    use utoipa::openapi::schema::{ObjectBuilder, Type};
    ObjectBuilder::new()
        .schema_type(Type::String)
        .enum_values(Some(["starting", "in_use", "lagging", "down"]))
        .build()
}

#[derive(Serialize, ToSchema)]
struct Database {
    status: Status,
    #[schema(schema_with = backend)]
    backend: Backend,
}

fn backend() -> utoipa::openapi::schema::Object {
    use utoipa::openapi::schema::{ObjectBuilder, Type};
    ObjectBuilder::new()
        .schema_type(Type::String)
        .enum_values(Some(["sqlite", "postgres"]))
        .description(Some("The database engine."))
        .build()
}

/// Liveness
///
/// The process is up and answering.
#[utoipa::path(
    get,
    path = "/health/live",
    operation_id = "getLiveness",
    tag = "health",
    responses((status = 200, description = "Alive.", body = Liveness)),
)]
async fn live() -> impl IntoResponse {
    Json(Liveness { status: Status::Ok })
}

/// Readiness
///
/// Whether the database answers: 200 when ready, 503 when not (take the instance out of
/// rotation).
#[utoipa::path(
    get,
    path = "/health/ready",
    operation_id = "getReadiness",
    tag = "health",
    responses(
        (status = 200, description = "Ready.", body = Readiness),
        (status = 503, description = "Not ready: the database does not answer.", body = Readiness),
    ),
)]
async fn ready(State(state): State<AppState>) -> impl IntoResponse {
    let backend = state.store.backend();
    let (alarm_states, ping) = tokio::join!(
        tokio::time::timeout(READY_TIMEOUT, state.store.alarm_states()),
        tokio::time::timeout(READY_TIMEOUT, state.store.ping()),
    );
    let alarms = match alarm_states {
        Ok(Ok(records)) => records
            .into_iter()
            .filter(|record| record.firing)
            .map(|record| {
                let (alarm, step) = crate::monitoring::alarms::split(&record.alarm);
                FiringAlarm {
                    alarm: alarm.to_string(),
                    step: step.map(str::to_string),
                    since: record.changed_at,
                }
            })
            .collect(),
        Ok(Err(_)) | Err(_) => Vec::new(),
    };
    let ping = ping.unwrap_or_else(|_| {
        Err(StoreError::Unavailable(format!(
            "no answer within {} ms",
            READY_TIMEOUT.as_millis()
        )))
    });
    let (code, status) = match ping {
        Ok(()) => (StatusCode::OK, Status::Ok),
        Err(error) => {
            tracing::warn!(%error, "readiness check failed");
            (StatusCode::SERVICE_UNAVAILABLE, Status::Unavailable)
        }
    };
    (
        code,
        Json(Readiness {
            status,
            components: Components {
                database: Database { status, backend },
                read_replica: state.store.read_replica().map(|replica| ReadReplica {
                    state: replica.state.as_str(),
                    lag_seconds: replica.lag_seconds,
                    max_lag_seconds: replica.max_lag_seconds,
                }),
            },
            alarms,
        }),
    )
}
