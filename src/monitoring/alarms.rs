//! Alarms: conditions on the database that an operator must hear about before customers do.
//!
//! An evaluator ([`run`]) checks them every interval in each process that runs workers. The
//! state of each alarm lives in the database (`alarm_state`); a change is recorded by a
//! conditional update ([`OpsStore::transition_alarm`](crate::store::ops::OpsStore)), so with many
//! processes evaluating the same condition exactly one records each transition, and only that one
//! enqueues the alert deliveries — durable `deliver_alert` jobs, one per webhook, written in the same
//! transaction, retried with backoff and dead-lettered like any step ([`super::webhook`]).
//!
//! | alarm | fires when |
//! |---|---|
//! | `oldest_job_age:<step>` | the oldest ready job of the step (retries included) is older than the limit |
//! | `dead_jobs` | at least N jobs are dead-lettered |
//! | `step_error_rate:<step>` | among the step's jobs that ended an attempt within the window, the failing share is above the limit |
//! | `orders_stuck_unpaid` | an order is still `pending_payment` past the limit |
//! | `orders_stuck_unfulfilled` | a paid order has not been fulfilled past the limit |
//! | `events_unpublished:nats` | an event has waited past the limit for NATS JetStream to acknowledge it |
//! | `webhook_endpoint_disabled:<id>` | a webhook endpoint was disabled by the relay (410 Gone, or failing too long) |

use std::collections::BTreeMap;
use std::time::Duration;

use chrono::{DateTime, Utc};
use serde_json::{Value, json};
use tokio::sync::watch;

use super::metrics::StuckLimits;
use super::webhook::DELIVER_ALERT;
use crate::clock;
use crate::store::ops::AlarmTransition;
use crate::store::{NewJob, Store, StoreResult};

/// Thresholds and where alerts go. `None` switches an alarm off.
#[derive(Clone, Debug)]
pub struct AlarmSettings {
    /// How often the evaluator looks.
    pub interval: Duration,
    /// Fire when a step's oldest ready job is older than this.
    pub oldest_job_age: Option<Duration>,
    /// Fire when at least this many jobs are dead.
    pub dead_jobs: Option<u64>,
    /// Fire when more than this share (0..1) of a step's recent jobs are failing.
    pub error_rate: Option<f64>,
    /// The window of the error rate.
    pub error_rate_window: Duration,
    /// Fewer jobs than this in the window never fire the error-rate alarm.
    pub error_rate_min_jobs: i64,
    /// Fire when an order is still unpaid this long after checkout.
    pub stuck_unpaid: Duration,
    /// Fire when a paid order is still not fulfilled this long after payment.
    pub stuck_unfulfilled: Duration,
    /// Where firing/resolved messages are POSTed.
    pub webhook_urls: Vec<String>,
    /// Attempts of one delivery before its job is dead-lettered.
    pub delivery_attempts: u32,
    /// Fire when an event has waited longer than this for NATS to acknowledge it.
    pub events_unpublished_age: Option<Duration>,
}

impl Default for AlarmSettings {
    fn default() -> Self {
        Self {
            interval: Duration::from_secs(15),
            oldest_job_age: Some(Duration::from_secs(300)),
            dead_jobs: Some(1),
            error_rate: Some(0.5),
            error_rate_window: Duration::from_secs(300),
            error_rate_min_jobs: 10,
            stuck_unpaid: Duration::from_secs(45 * 60),
            stuck_unfulfilled: Duration::from_secs(3600),
            webhook_urls: Vec::new(),
            delivery_attempts: 10,
            events_unpublished_age: Some(Duration::from_secs(60)),
        }
    }
}

impl AlarmSettings {
    pub fn stuck_limits(&self) -> StuckLimits {
        StuckLimits {
            unpaid: self.stuck_unpaid,
            unfulfilled: self.stuck_unfulfilled,
        }
    }
}

/// One alarm's condition as evaluated now.
#[derive(Clone, Debug, PartialEq)]
pub struct Condition {
    /// `name` or `name:step`.
    pub alarm: String,
    pub firing: bool,
    /// One line for people.
    pub summary: String,
    /// The numbers behind it.
    pub detail: Value,
}

/// Splits `name:step` into its parts.
pub fn split(alarm: &str) -> (&str, Option<&str>) {
    match alarm.split_once(':') {
        Some((name, step)) => (name, Some(step)),
        None => (alarm, None),
    }
}

/// Every enabled alarm's condition now.
pub async fn evaluate(store: &dyn Store, settings: &AlarmSettings, now: DateTime<Utc>) -> StoreResult<Vec<Condition>> {
    let mut conditions = Vec::new();
    let stats = store.queue_stats(now).await?;
    if let Some(limit) = settings.oldest_job_age {
        // Alert deliveries are not judged by alerts: a late or failing webhook would only queue
        // more deliveries to itself. Their backlog shows in /metrics, and a dead one in `dead_jobs`.
        for row in stats.iter().filter(|row| row.kind != DELIVER_ALERT) {
            let age = row.oldest_ready_age_seconds.unwrap_or(0.0);
            conditions.push(Condition {
                alarm: format!("oldest_job_age:{}", row.kind),
                firing: age > limit.as_secs_f64(),
                summary: format!(
                    "oldest ready {} job is {age:.1}s old (limit {}s)",
                    row.kind,
                    limit.as_secs_f64()
                ),
                detail: json!({ "step": row.kind, "oldest_ready_age_seconds": age, "ready": row.ready,
                    "limit_seconds": limit.as_secs_f64() }),
            });
        }
    }
    if let Some(limit) = settings.dead_jobs {
        let dead: i64 = stats.iter().map(|row| row.dead).sum();
        let by_step: BTreeMap<&str, i64> = stats
            .iter()
            .filter(|row| row.dead > 0)
            .map(|row| (row.kind.as_str(), row.dead))
            .collect();
        conditions.push(Condition {
            alarm: "dead_jobs".into(),
            firing: dead >= limit.max(1) as i64,
            summary: format!("{dead} dead-lettered job(s) await replay (limit {limit})"),
            detail: json!({ "dead": dead, "by_step": by_step, "limit": limit }),
        });
    }
    if let Some(limit) = settings.error_rate {
        let since = now - settings.error_rate_window;
        for row in store
            .step_outcomes(since)
            .await?
            .into_iter()
            .filter(|row| row.kind != DELIVER_ALERT)
        {
            let total = row.succeeded + row.failing;
            let rate = if total == 0 {
                0.0
            } else {
                row.failing as f64 / total as f64
            };
            conditions.push(Condition {
                alarm: format!("step_error_rate:{}", row.kind),
                firing: total >= settings.error_rate_min_jobs && rate > limit,
                summary: format!(
                    "{} of {total} recent {} jobs are failing ({:.0}%, limit {:.0}%)",
                    row.failing,
                    row.kind,
                    rate * 100.0,
                    limit * 100.0
                ),
                detail: json!({ "step": row.kind, "failing": row.failing, "succeeded": row.succeeded,
                    "error_rate": rate, "limit": limit,
                    "window_seconds": settings.error_rate_window.as_secs_f64() }),
            });
        }
    }
    let stuck = store
        .stuck_orders(now - settings.stuck_unpaid, now - settings.stuck_unfulfilled)
        .await?;
    conditions.push(Condition {
        alarm: "orders_stuck_unpaid".into(),
        firing: stuck.unpaid > 0,
        summary: format!(
            "{} order(s) unpaid for more than {}s",
            stuck.unpaid,
            settings.stuck_unpaid.as_secs()
        ),
        detail: json!({ "orders": stuck.unpaid, "limit_seconds": settings.stuck_unpaid.as_secs() }),
    });
    conditions.push(Condition {
        alarm: "orders_stuck_unfulfilled".into(),
        firing: stuck.unfulfilled > 0,
        summary: format!(
            "{} paid order(s) not fulfilled for more than {}s",
            stuck.unfulfilled,
            settings.stuck_unfulfilled.as_secs()
        ),
        detail: json!({ "orders": stuck.unfulfilled, "limit_seconds": settings.stuck_unfulfilled.as_secs() }),
    });
    if let Some(limit) = settings.events_unpublished_age
        && let Some(backlog) = store.events().channel_backlog(crate::events::NATS_CHANNEL, now).await?
    {
        let age = backlog.oldest_age_seconds.unwrap_or(0.0);
        conditions.push(Condition {
            alarm: format!("events_unpublished:{}", crate::events::NATS_CHANNEL),
            firing: age > limit.as_secs_f64(),
            summary: format!(
                "{} event(s) wait for NATS JetStream; the oldest for {age:.1}s (limit {}s)",
                backlog.unpublished,
                limit.as_secs_f64()
            ),
            detail: json!({ "channel": crate::events::NATS_CHANNEL, "unpublished": backlog.unpublished,
                "oldest_age_seconds": age, "published_through": backlog.published_through,
                "limit_seconds": limit.as_secs_f64() }),
        });
    }
    for endpoint in store.events().list_endpoints().await? {
        // Disabled by the relay (410, failing too long), not by an operator: somebody must look.
        let auto_disabled = endpoint.status == crate::store::events::EndpointStatus::Disabled
            && endpoint.disabled_reason.as_deref() != Some("disabled by an operator");
        conditions.push(Condition {
            alarm: format!("webhook_endpoint_disabled:{}", endpoint.id),
            firing: auto_disabled,
            summary: match (&endpoint.disabled_reason, auto_disabled) {
                (Some(reason), true) => format!("webhook endpoint {} was disabled: {reason}", endpoint.url),
                _ => format!("webhook endpoint {} is {}", endpoint.url, endpoint.status.as_str()),
            },
            detail: json!({ "endpoint_id": endpoint.id, "url": endpoint.url, "status": endpoint.status,
                "disabled_reason": endpoint.disabled_reason }),
        });
    }
    Ok(conditions)
}

/// The JSON an alert webhook receives.
pub fn message(condition: &Condition, at: DateTime<Utc>) -> Value {
    let (name, step) = split(&condition.alarm);
    json!({
        "id": uuid::Uuid::now_v7(),
        "source": "orderflow",
        "alarm": name,
        "step": step,
        "status": if condition.firing { "firing" } else { "resolved" },
        "at": at,
        "summary": condition.summary,
        "detail": condition.detail,
    })
}

/// Evaluates once and records every transition; returns the transitions this process made.
pub async fn evaluate_once(store: &dyn Store, settings: &AlarmSettings) -> StoreResult<Vec<Condition>> {
    let now = clock::now();
    let mut conditions = evaluate(store, settings, now).await?;
    let recorded: BTreeMap<String, bool> = store
        .alarm_states()
        .await?
        .into_iter()
        .map(|record| (record.alarm, record.firing))
        .collect();
    // Firing alarms no longer evaluated (switched off, or their step's jobs are gone) resolve.
    for (alarm, firing) in &recorded {
        if *firing && !conditions.iter().any(|c| &c.alarm == alarm) {
            conditions.push(Condition {
                alarm: alarm.clone(),
                firing: false,
                summary: "no longer evaluated".into(),
                detail: json!({}),
            });
        }
    }
    let mut made = Vec::new();
    for condition in conditions {
        if recorded.get(&condition.alarm).copied().unwrap_or(false) == condition.firing {
            continue;
        }
        let body = message(&condition, now).to_string();
        let deliveries = settings
            .webhook_urls
            .iter()
            .map(|url| NewJob {
                kind: DELIVER_ALERT,
                payload: json!({ "url": url, "body": body }),
                run_at: now,
                max_attempts: settings.delivery_attempts.max(1),
            })
            .collect();
        let transition = AlarmTransition {
            alarm: condition.alarm.clone(),
            firing: condition.firing,
            detail: condition.detail.to_string(),
            at: now,
            deliveries,
        };
        if store.transition_alarm(&transition).await? {
            if condition.firing {
                tracing::warn!(alarm = %condition.alarm, summary = %condition.summary, "alarm firing");
            } else {
                tracing::info!(alarm = %condition.alarm, summary = %condition.summary, "alarm resolved");
            }
            made.push(condition);
        }
    }
    Ok(made)
}

/// Evaluates the alarms every `settings.interval` until `stop` turns true.
pub async fn run(store: std::sync::Arc<dyn Store>, settings: AlarmSettings, mut stop: watch::Receiver<bool>) {
    loop {
        if let Err(error) = evaluate_once(store.as_ref(), &settings).await {
            tracing::warn!(%error, "evaluating alarms failed");
        }
        tokio::select! {
            _ = tokio::time::sleep(settings.interval) => {}
            _ = stop.wait_for(|stop| *stop) => return,
        }
    }
}
