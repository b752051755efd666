//! Prometheus metrics.
//!
//! Two kinds of numbers, kept apart on purpose:
//! - **Counters and histograms of this process** (HTTP requests, orders placed, step outcomes,
//!   payment calls) are recorded into a [`Metrics`] registry — one per app, not the global
//!   `metrics` recorder, so several apps in one process (tests) each count only their own.
//! - **Gauges describing the database** (queue depth, running, dead, oldest ready job age, stuck
//!   orders, alarm states) are read from the store at scrape time ([`Metrics::render`]), so every
//!   process reports the same exact values however many share the database.
//!
//! Every series carries a `region` label when the process was started with `--region`
//! ([`Metrics::for_region`]).

use std::collections::BTreeSet;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use metrics::{Unit, counter, describe_counter, describe_gauge, describe_histogram, gauge, histogram};
use metrics_exporter_prometheus::{PrometheusBuilder, PrometheusRecorder};

use crate::clock;
use crate::store::{Store, StoreResult};

/// The media type of the Prometheus text exposition format.
pub const CONTENT_TYPE: &str = "text/plain; version=0.0.4; charset=utf-8";

/// Histogram buckets (seconds) for request, step and provider latencies.
const BUCKETS: [f64; 13] = [
    0.001, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0,
];

/// How a step's run ended, as counted.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum StepOutcome {
    Succeeded,
    /// Failed; a retry is scheduled.
    Retrying,
    /// Failed and dead-lettered.
    Dead,
    /// Another worker took the job over; nothing counted but the run time.
    LeaseLost,
}

pub use crate::domain::events::CancelReason;

/// Limits that make an open order count as stuck (`orderflow_orders_stuck`).
#[derive(Clone, Copy, Debug)]
pub struct StuckLimits {
    pub unpaid: Duration,
    pub unfulfilled: Duration,
}

/// This app's metric registry. Cheap to clone; clones share the registry.
#[derive(Clone)]
pub struct Metrics(Arc<Inner>);

struct Inner {
    recorder: PrometheusRecorder,
    /// Step kinds seen so far, so a kind whose jobs all disappeared reports 0, not its last value.
    kinds: Mutex<BTreeSet<String>>,
    /// Alarms seen so far (same reason).
    alarms: Mutex<BTreeSet<String>>,
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}

impl std::fmt::Debug for Metrics {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Metrics")
    }
}

impl Metrics {
    pub fn new() -> Self {
        Self::for_region(None)
    }

    /// A registry whose every series carries `region="<region>"` when the process has a
    /// `--region`, so one Prometheus can scrape several regions' processes and still tell their
    /// counters apart (or sum them) without relabelling rules.
    pub fn for_region(region: Option<&str>) -> Self {
        let mut builder = PrometheusBuilder::new();
        if let Some(region) = region {
            builder = builder.add_global_label("region", region);
        }
        let recorder = builder
            .set_buckets(&BUCKETS)
            .expect("buckets are not empty")
            .build_recorder();
        let metrics = Metrics(Arc::new(Inner {
            recorder,
            kinds: Mutex::default(),
            alarms: Mutex::default(),
        }));
        metrics.with(describe);
        metrics
    }

    fn with<T>(&self, f: impl FnOnce() -> T) -> T {
        metrics::with_local_recorder(&self.0.recorder, f)
    }

    /// One HTTP request answered. `route` is the route template (`/orders/{id}`), never the raw
    /// path, so the number of series stays bounded.
    pub fn http_request(&self, method: &str, route: &str, status: u16, elapsed: Duration) {
        let (method, route) = (method.to_string(), route.to_string());
        self.with(|| {
            counter!("orderflow_http_requests_total", "method" => method.clone(), "route" => route.clone(),
                "status" => status.to_string())
            .increment(1);
            histogram!("orderflow_http_request_duration_seconds", "method" => method, "route" => route)
                .record(elapsed.as_secs_f64());
        });
    }

    /// An order was committed; its first step was enqueued.
    pub fn order_placed(&self, first_step: &str) {
        self.with(|| counter!("orderflow_orders_placed_total").increment(1));
        self.step_enqueued(first_step, 1);
    }

    pub fn order_fulfilled(&self) {
        self.with(|| counter!("orderflow_orders_fulfilled_total").increment(1));
    }

    pub fn orders_cancelled(&self, reason: CancelReason, count: u64) {
        self.with(|| counter!("orderflow_orders_cancelled_total", "reason" => reason.as_str()).increment(count));
    }

    /// An order cancelled through the API (`outcome` of `cancel_order`).
    pub fn cancellation(&self, outcome: crate::workflow::steps::CancelOutcome, by_operator: bool) {
        if let Some(step) = outcome.enqueued() {
            let reason = if by_operator {
                CancelReason::OperatorRequest
            } else {
                CancelReason::CustomerRequest
            };
            self.orders_cancelled(reason, 1);
            self.step_enqueued(step, 1);
        }
    }

    /// A worker of this process runs `step`: its counters start at 0 so rates work from the start.
    pub fn step_registered(&self, step: &str) {
        let step = step.to_string();
        self.0.kinds.lock().expect("not poisoned").insert(step.clone());
        self.with(|| {
            for name in [
                "orderflow_step_enqueued_total",
                "orderflow_step_succeeded_total",
                "orderflow_step_failed_total",
                "orderflow_step_dead_total",
            ] {
                counter!(name, "step" => step.clone()).increment(0);
            }
        });
    }

    pub fn step_enqueued(&self, step: &str, count: u64) {
        let step = step.to_string();
        self.with(|| counter!("orderflow_step_enqueued_total", "step" => step).increment(count));
    }

    /// One run of a step ended.
    pub fn step_finished(&self, step: &str, outcome: StepOutcome, elapsed: Duration) {
        let step = step.to_string();
        self.with(|| {
            histogram!("orderflow_step_duration_seconds", "step" => step.clone()).record(elapsed.as_secs_f64());
            match outcome {
                StepOutcome::Succeeded => counter!("orderflow_step_succeeded_total", "step" => step).increment(1),
                StepOutcome::Retrying => counter!("orderflow_step_failed_total", "step" => step).increment(1),
                StepOutcome::Dead => {
                    counter!("orderflow_step_failed_total", "step" => step.clone()).increment(1);
                    counter!("orderflow_step_dead_total", "step" => step).increment(1);
                }
                StepOutcome::LeaseLost => {}
            }
        });
    }

    /// One call to the payment provider: `operation` is `authorize`, `capture`, `void` or `refund`; `outcome` one of
    /// `succeeded`, `declined`, `unavailable`, `rejected`.
    pub fn payment(&self, operation: &'static str, outcome: &'static str, elapsed: Duration) {
        self.with(|| {
            counter!("orderflow_payments_total", "operation" => operation, "outcome" => outcome).increment(1);
            histogram!("orderflow_payment_provider_duration_seconds", "operation" => operation)
                .record(elapsed.as_secs_f64());
        });
    }

    /// One attempt to POST an alert to a webhook.
    pub fn alert_delivery(&self, outcome: &'static str) {
        self.with(|| counter!("orderflow_alert_deliveries_total", "outcome" => outcome).increment(1));
    }

    /// Events a channel (`nats`, `webhook`) acknowledged.
    pub fn events_published(&self, channel: &'static str, count: u64) {
        self.with(|| counter!("orderflow_events_published_total", "channel" => channel).increment(count));
    }

    /// Events a channel failed to take (they wait and are sent again).
    pub fn events_failed(&self, channel: &'static str, count: u64) {
        self.with(|| counter!("orderflow_events_failed_total", "channel" => channel).increment(count));
    }

    /// A failed delivery attempt to one webhook endpoint (labelled by endpoint id: operators create
    /// few endpoints, so the series stay bounded).
    pub fn webhook_failure(&self, endpoint: &str) {
        let endpoint = endpoint.to_string();
        self.with(|| counter!("orderflow_webhook_failures_total", "endpoint" => endpoint).increment(1));
    }

    /// The exposition text: this process's counters plus the database's gauges, read now.
    pub async fn render(&self, store: &dyn Store, stuck: StuckLimits) -> StoreResult<String> {
        let now = clock::now();
        let stats = store.queue_stats(now).await?;
        let alarms = store.alarm_states().await?;
        let stuck_orders = store.stuck_orders(now - stuck.unpaid, now - stuck.unfulfilled).await?;
        let pools = store.pool_stats();
        let replica = store.read_replica();
        let nats = store.events().channel_backlog(crate::events::NATS_CHANNEL, now).await?;
        let endpoints = store.events().endpoint_health(now).await?;
        let kinds: Vec<String> = {
            let mut kinds = self.0.kinds.lock().expect("not poisoned");
            kinds.extend(stats.iter().map(|s| s.kind.clone()));
            kinds.iter().cloned().collect()
        };
        let alarm_names: Vec<String> = {
            let mut known = self.0.alarms.lock().expect("not poisoned");
            known.extend(alarms.iter().map(|a| a.alarm.clone()));
            known.iter().cloned().collect()
        };
        self.with(|| {
            for kind in kinds {
                let row = stats.iter().find(|s| s.kind == kind).cloned().unwrap_or_default();
                gauge!("orderflow_step_ready_jobs", "step" => kind.clone()).set(row.ready as f64);
                gauge!("orderflow_step_running_jobs", "step" => kind.clone()).set(row.running as f64);
                gauge!("orderflow_step_dead_jobs", "step" => kind.clone()).set(row.dead as f64);
                gauge!("orderflow_step_oldest_ready_job_age_seconds", "step" => kind)
                    .set(row.oldest_ready_age_seconds.unwrap_or(0.0));
            }
            gauge!("orderflow_orders_stuck", "status" => "unpaid").set(stuck_orders.unpaid as f64);
            gauge!("orderflow_orders_stuck", "status" => "unfulfilled").set(stuck_orders.unfulfilled as f64);
            for pool in pools {
                let in_use = pool.size.saturating_sub(pool.idle);
                gauge!("orderflow_db_pool_connections", "pool" => pool.pool, "state" => "in_use").set(in_use as f64);
                gauge!("orderflow_db_pool_connections", "pool" => pool.pool, "state" => "idle").set(pool.idle as f64);
                gauge!("orderflow_db_pool_max_connections", "pool" => pool.pool).set(pool.max as f64);
            }
            if let Some(replica) = &replica {
                let in_use = replica.state == crate::store::ReplicaState::InUse;
                gauge!("orderflow_db_replica_in_use").set(if in_use { 1.0 } else { 0.0 });
                if let Some(lag) = replica.lag_seconds {
                    gauge!("orderflow_db_replica_lag_seconds").set(lag);
                }
                counter!("orderflow_db_replica_reads_total", "served_by" => "replica")
                    .absolute(replica.reads_served_by_replica);
                counter!("orderflow_db_replica_reads_total", "served_by" => "primary")
                    .absolute(replica.reads_served_by_primary);
                counter!("orderflow_db_replica_fallbacks_total").absolute(replica.fallbacks);
            }
            if let Some(nats) = nats {
                gauge!("orderflow_events_unpublished", "channel" => "nats").set(nats.unpublished as f64);
                gauge!("orderflow_events_oldest_unpublished_age_seconds", "channel" => "nats")
                    .set(nats.oldest_age_seconds.unwrap_or(0.0));
            }
            for endpoint in endpoints {
                let id = endpoint.endpoint_id.to_string();
                gauge!("orderflow_webhook_pending_deliveries", "endpoint" => id.clone()).set(endpoint.pending as f64);
                gauge!("orderflow_webhook_failing_deliveries", "endpoint" => id.clone()).set(endpoint.failing as f64);
                gauge!("orderflow_webhook_oldest_pending_age_seconds", "endpoint" => id.clone())
                    .set(endpoint.oldest_pending_age_seconds.unwrap_or(0.0));
                gauge!("orderflow_webhook_endpoint_enabled", "endpoint" => id).set(
                    if endpoint.status == crate::store::events::EndpointStatus::Enabled {
                        1.0
                    } else {
                        0.0
                    },
                );
            }
            for name in alarm_names {
                let firing = alarms.iter().any(|a| a.alarm == name && a.firing);
                let (alarm, step) = match name.split_once(':') {
                    Some((alarm, step)) => (alarm.to_string(), step.to_string()),
                    None => (name.clone(), String::new()),
                };
                gauge!("orderflow_alarm_firing", "alarm" => alarm, "step" => step).set(if firing { 1.0 } else { 0.0 });
            }
        });
        Ok(self.0.recorder.handle().render())
    }
}

fn describe() {
    describe_counter!(
        "orderflow_http_requests_total",
        "HTTP requests answered, by method, route template and status."
    );
    describe_histogram!(
        "orderflow_http_request_duration_seconds",
        Unit::Seconds,
        "HTTP request latency by route."
    );
    describe_counter!("orderflow_orders_placed_total", "Orders committed by checkout.");
    describe_counter!("orderflow_orders_fulfilled_total", "Orders handed to fulfilment.");
    describe_counter!("orderflow_orders_cancelled_total", "Orders cancelled, by reason.");
    describe_counter!("orderflow_step_enqueued_total", "Jobs enqueued, by step.");
    describe_counter!("orderflow_step_succeeded_total", "Step runs that committed, by step.");
    describe_counter!(
        "orderflow_step_failed_total",
        "Step runs that failed (retried or dead-lettered), by step."
    );
    describe_counter!("orderflow_step_dead_total", "Jobs dead-lettered, by step.");
    describe_histogram!(
        "orderflow_step_duration_seconds",
        Unit::Seconds,
        "Run time of one step attempt."
    );
    describe_gauge!(
        "orderflow_step_ready_jobs",
        "Jobs ready to run or waiting for a retry, by step (database)."
    );
    describe_gauge!(
        "orderflow_step_running_jobs",
        "Jobs claimed by a worker, by step (database)."
    );
    describe_gauge!(
        "orderflow_step_dead_jobs",
        "Dead-lettered jobs awaiting replay, by step (database)."
    );
    describe_gauge!(
        "orderflow_step_oldest_ready_job_age_seconds",
        Unit::Seconds,
        "Age of the oldest ready job, by step; retries do not reset it (database)."
    );
    describe_gauge!(
        "orderflow_orders_stuck",
        "Open orders past the stuck limit, by status (database)."
    );
    describe_counter!(
        "orderflow_payments_total",
        "Payment provider calls, by operation and outcome."
    );
    describe_histogram!(
        "orderflow_payment_provider_duration_seconds",
        Unit::Seconds,
        "Payment provider call latency."
    );
    describe_gauge!(
        "orderflow_db_pool_connections",
        "Database connections of this process, by pool and state."
    );
    describe_gauge!(
        "orderflow_db_pool_max_connections",
        "Largest size of each database pool."
    );
    describe_gauge!(
        "orderflow_db_replica_in_use",
        "1 while the read replica serves listings, reports and the audit; 0 while it is bypassed."
    );
    describe_gauge!(
        "orderflow_db_replica_lag_seconds",
        Unit::Seconds,
        "How far the read replica's replay was behind the primary at its last check."
    );
    describe_counter!(
        "orderflow_db_replica_reads_total",
        "Reads the replica may serve, by who served them (replica, or primary while it was bypassed)."
    );
    describe_counter!(
        "orderflow_db_replica_fallbacks_total",
        "Reads that failed on the replica and were served by the primary."
    );
    describe_gauge!(
        "orderflow_alarm_firing",
        "1 while an alarm fires, 0 otherwise (database)."
    );
    describe_counter!("orderflow_alert_deliveries_total", "Alert webhook POSTs, by outcome.");
    describe_counter!(
        "orderflow_events_published_total",
        "Events acknowledged by a channel (nats, webhook), by channel."
    );
    describe_counter!(
        "orderflow_events_failed_total",
        "Events a channel did not take (waiting to be re-sent), by channel."
    );
    describe_counter!(
        "orderflow_webhook_failures_total",
        "Failed webhook delivery attempts, by endpoint."
    );
    describe_gauge!(
        "orderflow_events_unpublished",
        "Events not yet acknowledged by an ordered channel (database)."
    );
    describe_gauge!(
        "orderflow_events_oldest_unpublished_age_seconds",
        Unit::Seconds,
        "Age of the oldest event a channel has not acknowledged (database)."
    );
    describe_gauge!(
        "orderflow_webhook_pending_deliveries",
        "Webhook deliveries waiting, by endpoint (database)."
    );
    describe_gauge!(
        "orderflow_webhook_failing_deliveries",
        "Waiting webhook deliveries that failed at least once, by endpoint (database)."
    );
    describe_gauge!(
        "orderflow_webhook_oldest_pending_age_seconds",
        Unit::Seconds,
        "Age of an endpoint's oldest waiting delivery (database)."
    );
    describe_gauge!(
        "orderflow_webhook_endpoint_enabled",
        "1 while a webhook endpoint is enabled, 0 when disabled (database)."
    );
}
