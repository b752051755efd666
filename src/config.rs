//! Typed configuration, read once at start-up: every flag has an `ORDERFLOW_*` environment
//! fallback, secrets never print, and bad values stop the program with a clear message.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::{Context, bail};
use clap::{Args, Parser, Subcommand, ValueEnum};

mod auth;

pub use self::auth::AuthArgs;
use crate::domain::Currency;
use crate::http::Secret;
use crate::http::auth::parse_ttl;
use crate::http::edge::{CorsSettings, EdgeSettings, Rate, RateLimits};
use crate::store::dsql_auth::{DsqlAuth, IamSettings};
use crate::store::{ConnectOptions, DatabasePooler, DatabaseProfile, SqliteDurability};

#[derive(Debug, Parser)]
#[command(
    name = "orderflow",
    version,
    about = "Order-processing and checkout engine",
    propagate_version = true
)]
pub struct Cli {
    #[command(flatten)]
    pub global: GlobalArgs,
    #[command(flatten)]
    pub serve: ServeArgs,
    /// What to do; `serve` when omitted.
    #[command(subcommand)]
    pub command: Option<Command>,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Serve the HTTP API (the default).
    Serve,
    /// Print a development JWT that a server with the same configuration accepts.
    Token(TokenArgs),
    /// Apply database migrations and exit.
    Migrate,
    /// Load the sample catalog (products whose SKU already exists are left alone).
    Seed,
    /// Check the invariants against the database (with `--payment-provider stripe`, also against
    /// Stripe's books through its API); exit 0 when all hold, 1 otherwise, 2 when they could not
    /// be checked.
    Audit(AuditArgs),
    /// Serve the sandbox payment provider over HTTP (Stripe's PaymentIntents API with test tokens), keeping
    /// its books in the configured database.
    SandboxProvider(SandboxProviderArgs),
    /// Inspect and replay durable jobs.
    Jobs {
        #[command(subcommand)]
        action: JobsAction,
    },
    /// Inspect the event feed and replay events to a webhook endpoint.
    Events {
        #[command(subcommand)]
        action: EventsAction,
    },
}

#[derive(Debug, Subcommand)]
pub enum EventsAction {
    /// Print events in position order (one CloudEvent JSON per line with `--json`).
    List {
        /// Events after this position.
        #[arg(long, default_value_t = 0)]
        after: i64,
        /// One type or a prefix, e.g. `order.*`.
        #[arg(long = "type")]
        event_type: Option<String>,
        #[arg(long, default_value_t = 50)]
        limit: u32,
        #[arg(long)]
        json: bool,
    },
    /// Queue events again for a webhook endpoint (the same event ids), by position or time range.
    Replay {
        /// The endpoint's id.
        #[arg(long)]
        endpoint: uuid::Uuid,
        #[arg(long, requires = "to_position", conflicts_with_all = ["since", "until"])]
        from_position: Option<i64>,
        #[arg(long, requires = "from_position")]
        to_position: Option<i64>,
        /// RFC 3339 time, e.g. 2026-12-01T00:00:00Z.
        #[arg(long, requires = "until")]
        since: Option<chrono::DateTime<chrono::Utc>>,
        #[arg(long, requires = "since")]
        until: Option<chrono::DateTime<chrono::Utc>>,
    },
}

#[derive(Debug, Args)]
pub struct SandboxProviderArgs {
    /// Address the sandbox provider listens on.
    #[arg(
        long = "provider-listen",
        env = "ORDERFLOW_SANDBOX_LISTEN",
        default_value = "127.0.0.1:8090"
    )]
    pub listen: SocketAddr,
    /// How long a `tok_timeout` charge's first answer is held (longer than the client timeout).
    #[arg(long, env = "ORDERFLOW_SANDBOX_TIMEOUT_DELAY", default_value = "15s", value_parser = parse_duration)]
    pub timeout_answer_delay: Duration,
    /// Require this bearer key on every provider call.
    #[arg(long, env = "ORDERFLOW_SANDBOX_API_KEY", hide_env_values = true)]
    pub api_key: Option<String>,
    /// Start without the `tok_unavailable` outage.
    #[arg(long)]
    pub no_outage: bool,
}

#[derive(Debug, Subcommand)]
pub enum JobsAction {
    /// List jobs (dead-lettered ones by default) with their errors.
    List {
        /// ready, running, succeeded or dead.
        #[arg(long, default_value = "dead")]
        state: String,
        /// Only this step kind, e.g. charge_payment.
        #[arg(long)]
        kind: Option<String>,
        #[arg(long, default_value_t = 50)]
        limit: u32,
    },
    /// Move dead jobs back to ready (their error history is kept).
    Replay {
        /// The job to replay.
        #[arg(required_unless_present = "all", conflicts_with = "all")]
        id: Option<uuid::Uuid>,
        /// Replay every dead job (of `--kind`, when given).
        #[arg(long)]
        all: bool,
        #[arg(long, requires = "all")]
        kind: Option<String>,
    },
}

/// Settings every command shares.
#[derive(Debug, Args)]
pub struct GlobalArgs {
    /// Database URL: `postgres://user@host/db`, or `sqlite://path`. Default: an embedded SQLite
    /// file in the data directory.
    #[arg(long, env = "ORDERFLOW_DATABASE_URL", global = true, hide_env_values = true)]
    pub database_url: Option<String>,
    /// A read replica (a PostgreSQL streaming standby) for order listings, the sales report and
    /// the audit's reads; checkout and the pipeline never read from it. PostgreSQL only. It is
    /// bypassed while unreachable or lagging (docs/scale-out.md "Read replica").
    #[arg(long, env = "ORDERFLOW_READ_DATABASE_URL", global = true, hide_env_values = true)]
    pub read_database_url: Option<String>,
    /// The replica serves reads only while its replay is at most this far behind the primary.
    #[arg(long, env = "ORDERFLOW_READ_REPLICA_MAX_LAG", default_value = "5s", value_parser = parse_duration, global = true)]
    pub read_replica_max_lag: Duration,
    /// The engine behind a `postgres://` URL: `postgres` (PostgreSQL itself) or `dsql`
    /// (PostgreSQL-compatible distributed SQL with Aurora DSQL's limits: no LISTEN/NOTIFY,
    /// advisory locks, SAVEPOINT or SKIP LOCKED, optimistic concurrency; migrations from
    /// `migrations/dsql`). Refused with a SQLite URL.
    #[arg(
        long,
        env = "ORDERFLOW_DATABASE_PROFILE",
        value_enum,
        default_value = "postgres",
        global = true
    )]
    pub database_profile: DatabaseProfile,
    /// What stands between orderflow and PostgreSQL: `none` (the server itself, or a pooler in
    /// session mode) or `transaction` (a pooler that lends a server connection per transaction,
    /// such as PgBouncer's `pool_mode = transaction`: then no statement cache, every statement in
    /// an explicit transaction, job wake-ups polled instead of LISTEN/NOTIFY, migrations under a
    /// transaction-scoped lock; docs/scale-out.md "PgBouncer and transaction poolers"). The read
    /// replica's URL is taken to go through the same kind of pooler. Refused with a SQLite URL.
    #[arg(
        long,
        env = "ORDERFLOW_DATABASE_POOLER",
        value_enum,
        default_value = "none",
        global = true
    )]
    pub database_pooler: DatabasePooler,
    /// Aurora DSQL IAM authentication: the cluster's AWS region (e.g. `us-east-1`). The host of
    /// `--database-url` is the cluster endpoint and every new connection's password is an IAM
    /// authentication token from the AWS credential chain (`DbConnectAdmin` for the user `admin`,
    /// `DbConnect` for any other), renewed before it expires; TLS is required (`sslmode`
    /// defaults to `verify-full`). Needs `--database-profile dsql` (docs/scale-out.md
    /// "Connecting to Aurora DSQL").
    #[arg(long, env = "ORDERFLOW_DSQL_REGION", global = true)]
    pub dsql_region: Option<String>,
    /// How long each IAM authentication token is valid (1m to 7d); a new one is installed at
    /// half of it.
    #[arg(long, env = "ORDERFLOW_DSQL_TOKEN_TTL", default_value = "15m", value_parser = parse_token_ttl, global = true)]
    pub dsql_token_ttl: Duration,
    /// Directory for the embedded database and the generated token secret.
    #[arg(long, env = "ORDERFLOW_DATA_DIR", default_value = "orderflow-data", global = true)]
    pub data_dir: PathBuf,
    /// HS256 signing secret for bearer tokens (at least 32 bytes). Default: a random secret kept
    /// in `<data-dir>/jwt-secret`. Set it explicitly when several processes share a database.
    #[arg(long, env = "ORDERFLOW_JWT_SECRET", global = true, hide_env_values = true)]
    pub jwt_secret: Option<String>,
    /// Most database connections this process holds.
    #[arg(long, env = "ORDERFLOW_DB_MAX_CONNECTIONS", default_value_t = 16, global = true)]
    pub db_max_connections: u32,
    /// Most step completions committed in one transaction (group commit: completions that wait
    /// while a group is written share the next; those that touch only their order are written
    /// together in a fixed number of statements, the rest each in a savepoint). Default: 32 on
    /// SQLite, 1 on PostgreSQL, where every completion commits alone (docs/BENCHMARKS.md, "Group
    /// commit after the lock-order fix", says why). Always 1 in the dsql profile.
    #[arg(long, env = "ORDERFLOW_COMMIT_BATCH", global = true,
          value_parser = clap::value_parser!(u32).range(1..=1000))]
    pub commit_batch: Option<u32>,
    /// Group transactions written at once. Default: 1 on SQLite (one writer), 2 on PostgreSQL
    /// (more committers make smaller groups: more statements per completion).
    #[arg(long, env = "ORDERFLOW_COMMIT_WRITERS", global = true,
          value_parser = clap::value_parser!(u32).range(1..=64))]
    pub commit_writers: Option<u32>,
    /// Most checkouts written in one transaction (one commit; one stock write per product, so a
    /// flash sale's hot product row is locked once per group); 1 writes each alone. Default 64.
    #[arg(long, env = "ORDERFLOW_CHECKOUT_BATCH", global = true,
          value_parser = clap::value_parser!(u32).range(1..=1000))]
    pub checkout_batch: Option<u32>,
    /// Checkout group transactions this process writes at once. Default 1 (more only contend
    /// for the same product rows; docs/BENCHMARKS.md "Shared checkout commits").
    #[arg(long, env = "ORDERFLOW_CHECKOUT_WRITERS", global = true,
          value_parser = clap::value_parser!(u32).range(1..=64))]
    pub checkout_writers: Option<u32>,
    /// Longest wait for a free database connection before answering 503 (e.g. 5s, 500ms).
    #[arg(long, env = "ORDERFLOW_DB_ACQUIRE_TIMEOUT", default_value = "5s", value_parser = parse_duration, global = true)]
    pub db_acquire_timeout: Duration,
    /// SQLite commit durability: `full` fsyncs every commit (survives power loss), `normal`
    /// survives process crashes only.
    #[arg(
        long,
        env = "ORDERFLOW_SQLITE_DURABILITY",
        value_enum,
        default_value = "full",
        global = true
    )]
    pub sqlite_durability: SqliteDurability,
    /// The store currency (ISO 4217).
    #[arg(long, env = "ORDERFLOW_CURRENCY", default_value = "USD", value_parser = parse_currency, global = true)]
    pub currency: Currency,
    /// Log format: `text` for people, `json` for log pipelines.
    #[arg(
        long,
        env = "ORDERFLOW_LOG_FORMAT",
        value_enum,
        default_value = "text",
        global = true
    )]
    pub log_format: LogFormat,
    /// Logs' static fields and OpenTelemetry traces.
    #[command(flatten)]
    pub telemetry: TelemetryArgs,
}

/// Where this process runs and where its traces go.
#[derive(Clone, Debug, Default, Args)]
pub struct TelemetryArgs {
    /// A region (or zone, or site) put on every JSON log line as `region` and on traces as
    /// `cloud.region`, e.g. `eu-west-1`.
    #[arg(long, env = "ORDERFLOW_REGION", global = true)]
    pub region: Option<String>,
    /// Export OpenTelemetry traces to this OTLP/HTTP collector (JSON encoding), e.g.
    /// `http://127.0.0.1:4318` (`/v1/traces` is appended). Tracing is off without it.
    #[arg(long, env = "OTEL_EXPORTER_OTLP_ENDPOINT", global = true)]
    pub otlp_endpoint: Option<String>,
    /// The `service.name` traces are reported under.
    #[arg(long, env = "OTEL_SERVICE_NAME", global = true, default_value = crate::telemetry::SERVICE_NAME)]
    pub otel_service_name: String,
}

/// How notifications are delivered.
#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub enum NotifierKind {
    /// `.eml` files in the mail directory.
    File,
    /// An SMTP server.
    Smtp,
}

/// Which payment provider the pipeline calls.
#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub enum PaymentProviderKind {
    /// The built-in sandbox, keeping its books in the shop's database.
    Sandbox,
    /// Stripe's API at `--stripe-api-base`: real Stripe, localstripe, or `orderflow
    /// sandbox-provider`.
    Stripe,
}

/// The parts of the system one process runs.
#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub enum Mode {
    /// HTTP API and job workers.
    All,
    /// HTTP API only.
    Api,
    /// Job workers only.
    Worker,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub enum LogFormat {
    Text,
    Json,
}

/// Events out (API.md "Events out"): where committed events go and how long they are kept.
#[derive(Debug, Args)]
pub struct EventArgs {
    /// The CloudEvent `source` of every event.
    #[arg(long, env = "ORDERFLOW_EVENTS_SOURCE", global = true, default_value = "orderflow")]
    pub events_source: String,
    /// NATS server to publish events to with JetStream (off when unset), e.g. `nats://127.0.0.1:4222`.
    #[arg(long, env = "ORDERFLOW_NATS_URL", global = true)]
    pub nats_url: Option<String>,
    /// The JetStream stream (created or updated on start) on subjects `orderflow.events.>`.
    #[arg(
        long,
        env = "ORDERFLOW_NATS_STREAM",
        global = true,
        default_value = "ORDERFLOW_EVENTS"
    )]
    pub nats_stream: String,
    /// The stream's duplicate window: re-sends within it are dropped by `Nats-Msg-Id`. Must be
    /// longer than a relay's worst re-send (its channel lease plus one batch).
    #[arg(long, env = "ORDERFLOW_NATS_DUPLICATE_WINDOW", global = true, default_value = "2m", value_parser = parse_duration)]
    pub nats_duplicate_window: Duration,
    /// Publish acknowledgements awaited at once.
    #[arg(long, env = "ORDERFLOW_NATS_MAX_IN_FLIGHT", global = true, default_value_t = 256, value_parser = clap::value_parser!(u32).range(1..=10000))]
    pub nats_max_in_flight: u32,
    /// How long one webhook delivery may take.
    #[arg(long, env = "ORDERFLOW_WEBHOOK_TIMEOUT", global = true, default_value = "15s", value_parser = parse_duration)]
    pub webhook_timeout: Duration,
    /// Webhook deliveries in flight at once per endpoint (across processes).
    #[arg(long, env = "ORDERFLOW_WEBHOOK_MAX_IN_FLIGHT", global = true, default_value_t = 8, value_parser = clap::value_parser!(u32).range(1..=1000))]
    pub webhook_max_in_flight: u32,
    /// Delays between a delivery's attempts, comma-separated (jittered ±10%); after the last the
    /// delivery has failed.
    #[arg(long, env = "ORDERFLOW_WEBHOOK_RETRY_SCHEDULE", global = true, value_delimiter = ',', default_value = "0s,5s,5m,30m,2h,5h,10h,14h,20h,24h", value_parser = parse_delay)]
    pub webhook_retry_schedule: Vec<Duration>,
    /// An endpoint failing continuously this long is disabled (with an alarm and a
    /// `webhook_endpoint.disabled` event).
    #[arg(long, env = "ORDERFLOW_WEBHOOK_DISABLE_AFTER", global = true, default_value = "5d", value_parser = parse_duration)]
    pub webhook_disable_after: Duration,
    /// How long events are kept (feed, replay) once every channel has them.
    #[arg(long, env = "ORDERFLOW_EVENT_RETENTION", global = true, default_value = "30d", value_parser = parse_duration)]
    pub event_retention: Duration,
    /// Longest sleep of the idle relay.
    #[arg(long, env = "ORDERFLOW_EVENTS_POLL", global = true, default_value = "1s", value_parser = parse_duration)]
    pub events_poll: Duration,
    /// How long a relay holds the NATS channel without renewing it: after a crash of its holder,
    /// another process takes over (and re-sends) once this runs out.
    #[arg(long, env = "ORDERFLOW_EVENTS_CHANNEL_LEASE", global = true, default_value = "15s", value_parser = parse_duration)]
    pub events_channel_lease: Duration,
}

impl EventArgs {
    pub fn settings(&self) -> anyhow::Result<crate::events::EventSettings> {
        use crate::adapters::events::nats::NatsSettings;
        use crate::events::{EventSettings, WebhookSettings};
        if self.events_source.trim().is_empty() {
            bail!("--events-source must not be empty");
        }
        if self.webhook_retry_schedule.is_empty() {
            bail!("--webhook-retry-schedule needs at least one delay");
        }
        let defaults = EventSettings::default();
        // A re-send after a crash comes at most one lease plus one batch's acks after the first send.
        if let Some(url) = &self.nats_url
            && self.nats_duplicate_window <= self.events_channel_lease * 2
        {
            bail!(
                "--nats-duplicate-window must be longer than twice --events-channel-lease ({}s), or re-sends to \
                 {url} after a crash could be stored twice",
                self.events_channel_lease.as_secs()
            );
        }
        Ok(EventSettings {
            source: self.events_source.clone(),
            nats: self.nats_url.as_ref().map(|url| NatsSettings {
                url: url.clone(),
                stream: self.nats_stream.clone(),
                duplicate_window: self.nats_duplicate_window,
                max_in_flight: self.nats_max_in_flight as usize,
                ..NatsSettings::default()
            }),
            webhooks: WebhookSettings {
                timeout: self.webhook_timeout,
                schedule: self.webhook_retry_schedule.clone(),
                max_in_flight: self.webhook_max_in_flight,
                disable_after: self.webhook_disable_after,
            },
            retention: self.event_retention,
            poll_interval: self.events_poll,
            channel_lease: self.events_channel_lease,
            ..defaults
        })
    }
}

/// Settings of the server; accepted as `orderflow --listen …` and `orderflow serve --listen …`.
#[derive(Debug, Args)]
pub struct ServeArgs {
    /// Address to listen on.
    #[arg(long, env = "ORDERFLOW_LISTEN", global = true, default_value = "127.0.0.1:8080")]
    pub listen: SocketAddr,
    /// Do not load the sample catalog into an empty database.
    #[arg(long, env = "ORDERFLOW_NO_SEED", global = true)]
    pub no_seed: bool,
    /// Largest request body in bytes.
    #[arg(long, env = "ORDERFLOW_BODY_LIMIT", global = true, default_value_t = crate::http::DEFAULT_BODY_LIMIT)]
    pub body_limit: usize,
    /// Bearer-token verification: algorithm, identity provider keys, issuer, audience, claims.
    #[command(flatten)]
    pub auth: AuthArgs,
    /// Events out: NATS JetStream, webhooks, retention.
    #[command(flatten)]
    pub events: EventArgs,
    /// How long shutdown waits for in-flight requests.
    #[arg(long, env = "ORDERFLOW_SHUTDOWN_TIMEOUT", global = true, default_value = "30s", value_parser = parse_duration)]
    pub shutdown_timeout: Duration,
    /// Attempts each forward step (payment, inventory, fulfilment, e-mail) gets before it is
    /// dead-lettered: the first try plus retries.
    #[arg(long, env = "ORDERFLOW_MAX_ATTEMPTS", global = true, default_value_t = 3, value_parser = clap::value_parser!(u32).range(1..=100))]
    pub max_attempts: u32,
    /// Attempts of compensations (refunds) before they are dead-lettered.
    #[arg(long, env = "ORDERFLOW_COMPENSATION_MAX_ATTEMPTS", global = true, default_value_t = 10, value_parser = clap::value_parser!(u32).range(1..=1000))]
    pub compensation_max_attempts: u32,
    /// What this process runs: `all` (API and workers), `api` or `worker`.
    #[arg(long, env = "ORDERFLOW_MODE", global = true, value_enum, default_value = "all")]
    pub mode: Mode,
    /// How long a claimed job stays invisible to other workers without a heartbeat.
    #[arg(long, env = "ORDERFLOW_JOB_LEASE", global = true, default_value = "30s", value_parser = parse_duration)]
    pub job_lease: Duration,
    /// Runs of one job that may die with their worker (its lease runs out) before it is
    /// dead-lettered as a poison job. A crash does not spend one of `--max-attempts`.
    #[arg(long, env = "ORDERFLOW_MAX_LEASE_EXPIRIES", global = true, default_value_t = 10, value_parser = clap::value_parser!(u32).range(1..=1000))]
    pub max_lease_expiries: u32,
    /// Jobs of one step kind running at once in this process.
    #[arg(long, env = "ORDERFLOW_JOB_CONCURRENCY", global = true, default_value_t = 8, value_parser = clap::value_parser!(u32).range(1..=1000))]
    pub job_concurrency: u32,
    /// First retry delay of a failed step; doubles per attempt (with jitter).
    #[arg(long, env = "ORDERFLOW_JOB_BACKOFF", global = true, default_value = "1s", value_parser = parse_duration)]
    pub job_backoff: Duration,
    /// Longest retry delay.
    #[arg(long, env = "ORDERFLOW_JOB_BACKOFF_MAX", global = true, default_value = "5m", value_parser = parse_duration)]
    pub job_backoff_max: Duration,
    /// Longest idle sleep of a worker when no wake-up arrives.
    #[arg(long, env = "ORDERFLOW_JOB_POLL", global = true, default_value = "5s", value_parser = parse_duration)]
    pub job_poll: Duration,
    /// How long finished jobs are kept.
    #[arg(long, env = "ORDERFLOW_JOB_RETENTION", global = true, default_value = "7d", value_parser = parse_duration)]
    pub job_retention: Duration,
    /// How long a checkout's Idempotency-Key is remembered after its answer: a retry within it
    /// replays the first answer, a request after it places a new order. Must cover the longest
    /// client retry window; at least 1h.
    #[arg(long, env = "ORDERFLOW_IDEMPOTENCY_RETENTION", global = true, default_value = "24h", value_parser = parse_idempotency_retention)]
    pub idempotency_retention: Duration,
    /// Orders unpaid this long after checkout are cancelled and their stock released.
    #[arg(long, env = "ORDERFLOW_RESERVATION_TTL", global = true, default_value = "30m", value_parser = parse_duration)]
    pub reservation_ttl: Duration,
    /// Where the file notifier writes e-mails (one `.eml` per message). Default: `<data-dir>/mail`.
    #[arg(long, env = "ORDERFLOW_MAIL_DIR", global = true)]
    pub mail_dir: Option<PathBuf>,
    /// Payment provider: the built-in `sandbox`, or `stripe` (Stripe's API at `--stripe-api-base`;
    /// `orderflow sandbox-provider` serves the sandbox in that protocol).
    #[arg(
        long,
        env = "ORDERFLOW_PAYMENT_PROVIDER",
        global = true,
        value_enum,
        default_value = "sandbox"
    )]
    pub payment_provider: PaymentProviderKind,
    /// Whether the built-in sandbox starts with its `tok_unavailable` outage on (`false` to end it:
    /// restart with it off, then replay the dead payment jobs).
    #[arg(long, env = "ORDERFLOW_SANDBOX_OUTAGE", global = true, default_value_t = true, action = clap::ArgAction::Set)]
    pub sandbox_outage: bool,
    /// Stripe's API base URL (`--payment-provider stripe`).
    #[arg(long, env = "ORDERFLOW_STRIPE_API_BASE", global = true, default_value = crate::adapters::payment::stripe::DEFAULT_API_BASE)]
    pub stripe_api_base: String,
    /// The Stripe secret key (`sk_…` or a restricted `rk_…`).
    #[arg(long, env = "ORDERFLOW_STRIPE_SECRET_KEY", global = true, hide_env_values = true)]
    pub stripe_secret_key: Option<String>,
    /// The signing secret (`whsec_…`) of the Stripe webhook endpoint pointed at `POST
    /// /webhooks/stripe`; several, comma-separated, while rolling it. Unset: that route answers 404.
    #[arg(
        long,
        env = "ORDERFLOW_STRIPE_WEBHOOK_SECRET",
        global = true,
        hide_env_values = true,
        value_delimiter = ','
    )]
    pub stripe_webhook_secret: Vec<String>,
    /// When the money is taken: `on-shipment` (authorize at checkout, capture when fulfilled) or
    /// `on-payment` (capture at once).
    #[arg(
        long,
        env = "ORDERFLOW_CAPTURE",
        global = true,
        value_enum,
        default_value = "on-shipment"
    )]
    pub capture: crate::workflow::steps::CaptureMode,
    /// Who ships: `auto` (the built-in step ships as soon as stock is committed) or `external`
    /// (a warehouse records shipments with `POST /orders/{id}/shipments`; the order is fulfilled
    /// when every unit has shipped). With `external`, set `--alarm-stuck-unfulfilled` to the
    /// warehouse's promise (e.g. `48h`).
    #[arg(
        long,
        env = "ORDERFLOW_FULFILMENT",
        global = true,
        value_enum,
        default_value = "auto"
    )]
    pub fulfilment: crate::workflow::steps::FulfilmentMode,
    /// Timeout of one call to the payment provider over HTTP.
    #[arg(long, env = "ORDERFLOW_PAYMENT_TIMEOUT", global = true, default_value = "10s", value_parser = parse_duration)]
    pub payment_timeout: Duration,
    /// How e-mails go out: `file` (one `.eml` per message in `--mail-dir`) or `smtp`.
    #[arg(long, env = "ORDERFLOW_NOTIFIER", global = true, value_enum, default_value = "file")]
    pub notifier: NotifierKind,
    /// SMTP server host.
    #[arg(long, env = "ORDERFLOW_SMTP_HOST", global = true)]
    pub smtp_host: Option<String>,
    /// SMTP port. Default: 587 for starttls, 465 for tls, 25 for none.
    #[arg(long, env = "ORDERFLOW_SMTP_PORT", global = true)]
    pub smtp_port: Option<u16>,
    /// SMTP transport security: `starttls` (required), `tls` (implicit) or `none`.
    #[arg(long, env = "ORDERFLOW_SMTP_TLS", global = true, default_value = "starttls", value_parser = parse_smtp_tls)]
    pub smtp_tls: crate::adapters::notify::smtp::SmtpTls,
    #[arg(long, env = "ORDERFLOW_SMTP_USERNAME", global = true)]
    pub smtp_username: Option<String>,
    #[arg(long, env = "ORDERFLOW_SMTP_PASSWORD", global = true, hide_env_values = true)]
    pub smtp_password: Option<String>,
    /// Longest time one delivery may take.
    #[arg(long, env = "ORDERFLOW_SMTP_TIMEOUT", global = true, default_value = "30s", value_parser = parse_duration)]
    pub smtp_timeout: Duration,
    /// The From address of e-mails.
    #[arg(
        long,
        env = "ORDERFLOW_MAIL_FROM",
        global = true,
        default_value = "orderflow <orders@localhost>"
    )]
    pub mail_from: String,
    #[command(flatten)]
    pub edge: EdgeArgs,
    #[command(flatten)]
    pub monitoring: MonitoringArgs,
}

/// The front door: rate limits, overload bounds, caching, CORS and security headers.
#[derive(Debug, Args)]
pub struct EdgeArgs {
    /// Public catalog reads per principal (client IP when anonymous): `100/s`, `600/m`, `off`.
    #[arg(long, env = "ORDERFLOW_RATE_LIMIT_CATALOG", global = true, default_value = "100/s", value_parser = parse_rate)]
    pub rate_limit_catalog: RateArg,
    /// Reads of a principal's own orders and customer record.
    #[arg(long, env = "ORDERFLOW_RATE_LIMIT_READS", global = true, default_value = "50/s", value_parser = parse_rate)]
    pub rate_limit_reads: RateArg,
    /// Placing and cancelling orders, creating customers.
    #[arg(long, env = "ORDERFLOW_RATE_LIMIT_WRITES", global = true, default_value = "20/s", value_parser = parse_rate)]
    pub rate_limit_writes: RateArg,
    /// Admin routes and catalog changes.
    #[arg(long, env = "ORDERFLOW_RATE_LIMIT_ADMIN", global = true, default_value = "50/s", value_parser = parse_rate)]
    pub rate_limit_admin: RateArg,
    /// Most requests handled at once; beyond it 503 with Retry-After at once.
    #[arg(long, env = "ORDERFLOW_MAX_IN_FLIGHT", global = true, default_value_t = 1024, value_parser = clap::value_parser!(u32).range(1..))]
    pub max_in_flight: u32,
    /// Longest a handler may run before 503 (a `Prefer: wait=N` long-poll gets N on top).
    #[arg(long, env = "ORDERFLOW_HANDLER_TIMEOUT", global = true, default_value = "15s", value_parser = parse_duration)]
    pub handler_timeout: Duration,
    /// Longest a client may take to send a request body before 408.
    #[arg(long, env = "ORDERFLOW_BODY_TIMEOUT", global = true, default_value = "10s", value_parser = parse_duration)]
    pub body_timeout: Duration,
    /// Longest a client may take to send a request's headers before the connection is closed.
    #[arg(long, env = "ORDERFLOW_HEADER_TIMEOUT", global = true, default_value = "10s", value_parser = parse_duration)]
    pub header_timeout: Duration,
    /// `Cache-Control` of public catalog reads.
    #[arg(long, env = "ORDERFLOW_CATALOG_CACHE_CONTROL", global = true, default_value = crate::http::edge::DEFAULT_CATALOG_CACHE_CONTROL)]
    pub catalog_cache_control: String,
    /// `Strict-Transport-Security` sent on every response; empty sends none.
    #[arg(long, env = "ORDERFLOW_HSTS", global = true, default_value = crate::http::edge::DEFAULT_HSTS)]
    pub hsts: String,
    /// Browser origins allowed to call the API (comma-separated, or `*`). Empty: CORS off.
    #[arg(long, env = "ORDERFLOW_CORS_ALLOWED_ORIGINS", global = true, value_delimiter = ',')]
    pub cors_allowed_origins: Vec<String>,
    /// Methods allowed cross-origin.
    #[arg(
        long,
        env = "ORDERFLOW_CORS_ALLOWED_METHODS",
        global = true,
        value_delimiter = ',',
        default_value = "GET,POST,PATCH"
    )]
    pub cors_allowed_methods: Vec<axum::http::Method>,
    /// Request headers allowed cross-origin.
    #[arg(
        long,
        env = "ORDERFLOW_CORS_ALLOWED_HEADERS",
        global = true,
        value_delimiter = ',',
        default_value = "authorization,content-type,idempotency-key,if-none-match,prefer,x-correlation-id"
    )]
    pub cors_allowed_headers: Vec<String>,
    /// How long browsers may cache a preflight answer.
    #[arg(long, env = "ORDERFLOW_CORS_MAX_AGE", global = true, default_value = "10m", value_parser = parse_duration)]
    pub cors_max_age: Duration,
    /// Proxies in front of orderflow that append to X-Forwarded-For (0: use the peer address).
    #[arg(long, env = "ORDERFLOW_TRUSTED_PROXY_HOPS", global = true, default_value_t = 0)]
    pub trusted_proxy_hops: usize,
}

impl EdgeArgs {
    pub fn settings(&self) -> EdgeSettings {
        EdgeSettings {
            rate_limits: RateLimits {
                catalog: self.rate_limit_catalog.0,
                reads: self.rate_limit_reads.0,
                writes: self.rate_limit_writes.0,
                admin: self.rate_limit_admin.0,
            },
            max_in_flight: self.max_in_flight as usize,
            handler_timeout: self.handler_timeout,
            body_timeout: self.body_timeout,
            header_timeout: self.header_timeout,
            catalog_cache_control: self.catalog_cache_control.clone(),
            hsts: self.hsts.clone(),
            cors: CorsSettings {
                allowed_origins: self
                    .cors_allowed_origins
                    .iter()
                    .filter(|o| !o.is_empty())
                    .cloned()
                    .collect(),
                allowed_methods: self.cors_allowed_methods.clone(),
                allowed_headers: self
                    .cors_allowed_headers
                    .iter()
                    .map(|h| h.trim().to_ascii_lowercase())
                    .collect(),
                max_age: self.cors_max_age,
            },
            trusted_proxy_hops: self.trusted_proxy_hops,
        }
    }
}

/// Who may scrape `/metrics`, alarm thresholds, and where alerts go.
#[derive(Debug, Args)]
pub struct MonitoringArgs {
    /// Who may read `/metrics`: `public`, or `admin` (a token with the admin role, or the scrape
    /// token).
    #[arg(
        long,
        env = "ORDERFLOW_METRICS_ACCESS",
        global = true,
        value_enum,
        default_value = "public"
    )]
    pub metrics_access: MetricsAccessArg,
    /// A static bearer token Prometheus may scrape `/metrics` with (implies `--metrics-access admin`).
    #[arg(long, env = "ORDERFLOW_METRICS_TOKEN", global = true, hide_env_values = true)]
    pub metrics_token: Option<String>,
    /// Also serve `/metrics` (only) on this address, e.g. for a `--mode worker` process, which
    /// serves no API.
    #[arg(long, env = "ORDERFLOW_METRICS_LISTEN", global = true)]
    pub metrics_listen: Option<SocketAddr>,
    /// How often alarms are evaluated.
    #[arg(long, env = "ORDERFLOW_ALARM_INTERVAL", global = true, default_value = "15s", value_parser = parse_duration)]
    pub alarm_interval: Duration,
    /// Fire `oldest_job_age` when a step's oldest ready job is older than this (`off` disables).
    #[arg(long, env = "ORDERFLOW_ALARM_OLDEST_JOB_AGE", global = true, default_value = "5m", value_parser = parse_optional_duration)]
    pub alarm_oldest_job_age: OptionalDuration,
    /// Fire `events_unpublished:nats` when an event has waited longer than this for NATS
    /// JetStream to acknowledge it (`off` disables).
    #[arg(long, env = "ORDERFLOW_ALARM_EVENTS_UNPUBLISHED_AGE", global = true, default_value = "1m", value_parser = parse_optional_duration)]
    pub alarm_events_unpublished_age: OptionalDuration,
    /// Fire `dead_jobs` when at least this many jobs are dead-lettered (0 disables).
    #[arg(long, env = "ORDERFLOW_ALARM_DEAD_JOBS", global = true, default_value_t = 1)]
    pub alarm_dead_jobs: u64,
    /// Fire `step_error_rate` when more than this share (0–1) of a step's recent jobs fail (0 disables).
    #[arg(long, env = "ORDERFLOW_ALARM_ERROR_RATE", global = true, default_value_t = 0.5)]
    pub alarm_error_rate: f64,
    /// The window of the error rate.
    #[arg(long, env = "ORDERFLOW_ALARM_ERROR_RATE_WINDOW", global = true, default_value = "5m", value_parser = parse_duration)]
    pub alarm_error_rate_window: Duration,
    /// Fewest jobs in the window for the error rate to count.
    #[arg(
        long,
        env = "ORDERFLOW_ALARM_ERROR_RATE_MIN_JOBS",
        global = true,
        default_value_t = 10
    )]
    pub alarm_error_rate_min_jobs: u32,
    /// Fire `orders_stuck_unpaid` when an order is unpaid this long after checkout.
    #[arg(long, env = "ORDERFLOW_ALARM_STUCK_UNPAID", global = true, default_value = "45m", value_parser = parse_duration)]
    pub alarm_stuck_unpaid: Duration,
    /// Fire `orders_stuck_unfulfilled` when a paid order is unfulfilled this long.
    #[arg(long, env = "ORDERFLOW_ALARM_STUCK_UNFULFILLED", global = true, default_value = "1h", value_parser = parse_duration)]
    pub alarm_stuck_unfulfilled: Duration,
    /// POST firing/resolved alerts to this URL (repeatable, or comma-separated).
    #[arg(
        long = "alert-webhook-url",
        env = "ORDERFLOW_ALERT_WEBHOOK_URLS",
        global = true,
        value_delimiter = ','
    )]
    pub alert_webhook_urls: Vec<String>,
    /// HMAC-SHA256 key of the `X-Orderflow-Signature` header (required with a webhook URL).
    #[arg(long, env = "ORDERFLOW_ALERT_WEBHOOK_SECRET", global = true, hide_env_values = true)]
    pub alert_webhook_secret: Option<String>,
    /// Attempts of one alert delivery before it is dead-lettered.
    #[arg(long, env = "ORDERFLOW_ALERT_DELIVERY_ATTEMPTS", global = true, default_value_t = 10, value_parser = clap::value_parser!(u32).range(1..=1000))]
    pub alert_delivery_attempts: u32,
    /// Timeout of one alert POST.
    #[arg(long, env = "ORDERFLOW_ALERT_WEBHOOK_TIMEOUT", global = true, default_value = "10s", value_parser = parse_duration)]
    pub alert_webhook_timeout: Duration,
}

/// `--metrics-access` values.
#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub enum MetricsAccessArg {
    Public,
    Admin,
}

/// A duration flag that may be `off`.
#[derive(Clone, Copy, Debug)]
pub struct OptionalDuration(pub Option<Duration>);

fn parse_optional_duration(text: &str) -> Result<OptionalDuration, String> {
    if text.eq_ignore_ascii_case("off") {
        return Ok(OptionalDuration(None));
    }
    parse_duration(text).map(|d| OptionalDuration(Some(d)))
}

impl MonitoringArgs {
    /// Alarm thresholds; refuses webhooks without a secret and nonsense rates.
    pub fn alarm_settings(&self) -> anyhow::Result<crate::monitoring::AlarmSettings> {
        let urls: Vec<String> = self
            .alert_webhook_urls
            .iter()
            .map(|u| u.trim().to_string())
            .filter(|u| !u.is_empty())
            .collect();
        for url in &urls {
            if !(url.starts_with("http://") || url.starts_with("https://")) {
                bail!("--alert-webhook-url `{url}` must be an http:// or https:// URL");
            }
        }
        if !urls.is_empty() && self.alert_webhook_secret.as_deref().is_none_or(|s| s.len() < 16) {
            bail!(
                "--alert-webhook-url needs --alert-webhook-secret (ORDERFLOW_ALERT_WEBHOOK_SECRET) of at least 16 bytes"
            );
        }
        if !(0.0..=1.0).contains(&self.alarm_error_rate) {
            bail!("--alarm-error-rate must be between 0 and 1");
        }
        if self.alarm_interval.is_zero() {
            bail!("--alarm-interval must be more than 0");
        }
        Ok(crate::monitoring::AlarmSettings {
            interval: self.alarm_interval,
            oldest_job_age: self.alarm_oldest_job_age.0,
            dead_jobs: (self.alarm_dead_jobs > 0).then_some(self.alarm_dead_jobs),
            error_rate: (self.alarm_error_rate > 0.0).then_some(self.alarm_error_rate),
            error_rate_window: self.alarm_error_rate_window,
            error_rate_min_jobs: i64::from(self.alarm_error_rate_min_jobs),
            stuck_unpaid: self.alarm_stuck_unpaid,
            stuck_unfulfilled: self.alarm_stuck_unfulfilled,
            webhook_urls: urls,
            delivery_attempts: self.alert_delivery_attempts,
            events_unpublished_age: self.alarm_events_unpublished_age.0,
        })
    }

    pub fn metrics_access(&self) -> crate::monitoring::MetricsAccess {
        use crate::monitoring::{MetricsAccess, ScrapeToken};
        let scrape_token = self.metrics_token.clone().filter(|t| !t.is_empty()).map(ScrapeToken);
        match (self.metrics_access, scrape_token) {
            (MetricsAccessArg::Public, None) => MetricsAccess::Public,
            (_, scrape_token) => MetricsAccess::Restricted { scrape_token },
        }
    }
}

#[derive(Debug, Args)]
pub struct TokenArgs {
    /// The subject: a customer id (UUID) for customers, any name for operators.
    #[arg(long)]
    pub sub: String,
    /// A role to grant (repeatable), e.g. `admin`.
    #[arg(long = "role")]
    pub roles: Vec<String>,
    /// How long the token is valid, e.g. 30m, 1h, 7d.
    #[arg(long, default_value = "1h", value_parser = parse_duration)]
    pub ttl: Duration,
}

#[derive(Debug, Args)]
pub struct AuditArgs {
    /// Print the report as JSON.
    #[arg(long)]
    pub json: bool,
}

impl GlobalArgs {
    /// How logs and traces are set up.
    pub fn telemetry_settings(&self) -> crate::telemetry::TelemetrySettings {
        crate::telemetry::TelemetrySettings {
            log_format: self.log_format,
            region: self.telemetry.region.clone().filter(|r| !r.trim().is_empty()),
            otlp_endpoint: self.telemetry.otlp_endpoint.clone(),
            service_name: Some(self.telemetry.otel_service_name.trim())
                .filter(|name| !name.is_empty())
                .unwrap_or(crate::telemetry::SERVICE_NAME)
                .to_string(),
        }
    }

    /// The database URL in force: the configured one or the embedded default.
    pub fn database_url(&self) -> String {
        match &self.database_url {
            Some(url) => url.clone(),
            None => format!("sqlite://{}", self.data_dir.join("orderflow.db").display()),
        }
    }

    /// Where the file notifier writes.
    pub fn mail_dir(&self, serve: &ServeArgs) -> PathBuf {
        serve.mail_dir.clone().unwrap_or_else(|| self.data_dir.join("mail"))
    }

    pub fn connect_options(&self) -> anyhow::Result<ConnectOptions> {
        if self.db_max_connections == 0 {
            bail!("--db-max-connections must be at least 1");
        }
        let dsql_auth = match self.dsql_region.as_deref().map(str::trim) {
            None | Some("") => None,
            Some(region) => {
                if self.database_profile != DatabaseProfile::Dsql {
                    bail!(
                        "--dsql-region (Aurora DSQL IAM authentication) needs --database-profile dsql; without \
                         --dsql-region the password is the one in --database-url"
                    );
                }
                Some(DsqlAuth::Iam(IamSettings {
                    region: region.to_string(),
                    token_ttl: self.dsql_token_ttl,
                }))
            }
        };
        Ok(ConnectOptions {
            dsql_auth,
            profile: self.database_profile,
            pooler: self.database_pooler,
            max_connections: self.db_max_connections,
            acquire_timeout: self.db_acquire_timeout,
            sqlite_durability: self.sqlite_durability,
            group_commit: crate::store::group_commit::GroupCommitSettings {
                max_batch: self.commit_batch.map(|n| n as usize),
                committers: self.commit_writers.map(|n| n as usize),
            },
            checkout_batch: crate::store::CheckoutBatchSettings {
                max_batch: self.checkout_batch.map(|n| n as usize),
                writers: self.checkout_writers.map(|n| n as usize),
            },
            read_replica: self
                .read_database_url
                .as_ref()
                .filter(|url| !url.trim().is_empty())
                .map(|url| crate::store::ReadReplicaSettings {
                    url: url.clone(),
                    max_lag: self.read_replica_max_lag,
                }),
        })
    }

    /// The token secret: configured, or generated once and kept in the data directory.
    pub fn jwt_secret(&self) -> anyhow::Result<Secret> {
        if let Some(secret) = &self.jwt_secret {
            if secret.len() < 32 {
                bail!("ORDERFLOW_JWT_SECRET / --jwt-secret must be at least 32 bytes long");
            }
            return Ok(Secret::new(secret.as_bytes().to_vec()));
        }
        load_or_create_secret(&self.data_dir.join("jwt-secret"))
    }
}

fn load_or_create_secret(path: &Path) -> anyhow::Result<Secret> {
    use std::io::Write;
    if let Ok(existing) = std::fs::read_to_string(path) {
        let existing = existing.trim();
        if existing.len() >= 32 {
            return Ok(Secret::new(existing.as_bytes().to_vec()));
        }
        bail!(
            "{} holds a secret shorter than 32 bytes; delete it to generate a new one",
            path.display()
        );
    }
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    }
    let secret: String = (0..32).map(|_| format!("{:02x}", rand::random::<u8>())).collect();
    let mut options = std::fs::OpenOptions::new();
    options.write(true).create_new(true);
    #[cfg(unix)]
    std::os::unix::fs::OpenOptionsExt::mode(&mut options, 0o600);
    match options.open(path) {
        Ok(mut file) => {
            file.write_all(secret.as_bytes())?;
            file.sync_all()?;
            Ok(Secret::new(secret.into_bytes()))
        }
        // Another process created it first: use theirs.
        Err(error) if error.kind() == std::io::ErrorKind::AlreadyExists => load_or_create_secret(path),
        Err(error) => Err(error).with_context(|| format!("writing the token secret {}", path.display())),
    }
}

pub fn parse_duration(text: &str) -> Result<Duration, String> {
    if let Some(ms) = text.strip_suffix("ms") {
        return ms
            .parse::<u64>()
            .map(Duration::from_millis)
            .map_err(|_| format!("`{text}` is not a duration"));
    }
    parse_ttl(text)
}

/// `--dsql-token-ttl`: within what Aurora DSQL accepts.
fn parse_token_ttl(text: &str) -> Result<Duration, String> {
    use crate::store::dsql_auth::{MAX_TOKEN_TTL, MIN_TOKEN_TTL};
    let ttl = parse_duration(text)?;
    if ttl < MIN_TOKEN_TTL || ttl > MAX_TOKEN_TTL {
        return Err(format!("`{text}` is out of range: a token lives from 1m to 7d"));
    }
    Ok(ttl)
}

/// `--idempotency-retention`: a duration no shorter than
/// [`MIN_RETENTION`](crate::workflow::idempotency::MIN_RETENTION).
fn parse_idempotency_retention(text: &str) -> Result<Duration, String> {
    use crate::workflow::idempotency::MIN_RETENTION;
    let retention = parse_duration(text)?;
    if retention < MIN_RETENTION {
        return Err(format!(
            "must be at least {}h: a key forgotten sooner may be forgotten while its client still retries, \
             and that retry would place a second order",
            MIN_RETENTION.as_secs() / 3600
        ));
    }
    Ok(retention)
}

/// A delay that may be zero (`0`, `0s`): the first entry of a retry schedule is "at once".
fn parse_delay(text: &str) -> Result<Duration, String> {
    match text.trim() {
        "0" | "0s" | "0ms" => Ok(Duration::ZERO),
        other => parse_duration(other),
    }
}

/// A rate limit flag's value: `None` is `off`.
#[derive(Clone, Copy, Debug)]
pub struct RateArg(pub Option<Rate>);

fn parse_rate(text: &str) -> Result<RateArg, String> {
    Rate::parse(text).map(RateArg)
}

fn parse_smtp_tls(text: &str) -> Result<crate::adapters::notify::smtp::SmtpTls, String> {
    text.parse().map_err(|e| format!("{e}"))
}

fn parse_currency(text: &str) -> Result<Currency, String> {
    text.parse()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bad_values_are_refused_clearly() {
        let error = Cli::try_parse_from(["orderflow", "--currency", "DOLLARS"])
            .unwrap_err()
            .to_string();
        assert!(error.contains("ISO 4217"), "{error}");
        let error = Cli::try_parse_from(["orderflow", "serve", "--listen", "nowhere"])
            .unwrap_err()
            .to_string();
        assert!(error.contains("--listen"), "{error}");
        assert!(Cli::try_parse_from(["orderflow", "token", "--sub", "x", "--ttl", "forever"]).is_err());
    }

    #[test]
    fn alarm_flags_are_checked() {
        let settings = |args: &[&str]| {
            let cli = Cli::try_parse_from([&["orderflow"], args].concat()).unwrap();
            cli.serve.monitoring.alarm_settings()
        };
        let error = settings(&["--alert-webhook-url", "https://hooks.example.com/a"])
            .unwrap_err()
            .to_string();
        assert!(error.contains("--alert-webhook-secret"), "{error}");
        assert!(
            settings(&[
                "--alert-webhook-url",
                "ftp://x",
                "--alert-webhook-secret",
                "0123456789abcdef"
            ])
            .is_err()
        );
        assert!(settings(&["--alarm-error-rate", "1.5"]).is_err());
        let ok = settings(&[
            "--alert-webhook-url",
            "https://a.example.com/x,https://b.example.com/y",
            "--alert-webhook-secret",
            "0123456789abcdef",
            "--alarm-oldest-job-age",
            "off",
            "--alarm-dead-jobs",
            "0",
            "--alarm-interval",
            "500ms",
        ])
        .unwrap();
        assert_eq!(ok.webhook_urls.len(), 2);
        assert_eq!((ok.oldest_job_age, ok.dead_jobs), (None, None));
        assert_eq!(ok.interval, Duration::from_millis(500));
        let defaults = settings(&[]).unwrap();
        assert_eq!(defaults.oldest_job_age, Some(Duration::from_secs(300)));
        assert!(matches!(
            Cli::try_parse_from(["orderflow", "--metrics-token", "t"])
                .unwrap()
                .serve
                .monitoring
                .metrics_access(),
            crate::monitoring::MetricsAccess::Restricted { scrape_token: Some(_) }
        ));
    }

    #[test]
    fn idempotency_retention_has_a_floor() {
        let retention = |args: &[&str]| Cli::try_parse_from([&["orderflow"], args].concat()).map(|cli| cli.serve);
        assert_eq!(
            retention(&[]).unwrap().idempotency_retention,
            Duration::from_secs(86_400)
        );
        let two_days = retention(&["serve", "--idempotency-retention", "2d"]).unwrap();
        assert_eq!(two_days.idempotency_retention, Duration::from_secs(2 * 86_400));
        let error = retention(&["--idempotency-retention", "10m"]).unwrap_err().to_string();
        assert!(
            error.contains("--idempotency-retention") && error.contains("at least 1h"),
            "{error}"
        );
    }

    #[test]
    fn the_dsql_profile_needs_a_postgres_url() {
        let cli = Cli::try_parse_from(["orderflow", "--database-profile", "dsql", "migrate"]).unwrap();
        assert_eq!(cli.global.database_profile, DatabaseProfile::Dsql);
        let runtime = tokio::runtime::Builder::new_current_thread().build().unwrap();
        let refused = runtime
            .block_on(crate::store::connect(
                "sqlite:///tmp/never-created.db",
                &cli.global.connect_options().unwrap(),
            ))
            .err()
            .expect("refused");
        let message = refused.to_string();
        assert!(
            message.contains("--database-profile dsql needs a postgres:// database URL"),
            "{message}"
        );
        assert!(!std::path::Path::new("/tmp/never-created.db").exists());
        let error = Cli::try_parse_from(["orderflow", "--database-profile", "mysql", "migrate"])
            .unwrap_err()
            .to_string();
        assert!(error.contains("--database-profile"), "{error}");
        assert_eq!(
            Cli::try_parse_from(["orderflow", "migrate"])
                .unwrap()
                .global
                .database_profile,
            DatabaseProfile::Postgres
        );
    }

    #[test]
    fn the_transaction_pooler_setting_needs_a_postgres_url() {
        let cli = Cli::try_parse_from(["orderflow", "--database-pooler", "transaction", "migrate"]).unwrap();
        assert_eq!(cli.global.database_pooler, DatabasePooler::Transaction);
        let runtime = tokio::runtime::Builder::new_current_thread().build().unwrap();
        let refused = runtime
            .block_on(crate::store::connect(
                "sqlite:///tmp/never-created-pooler.db",
                &cli.global.connect_options().unwrap(),
            ))
            .err()
            .expect("refused");
        let message = refused.to_string();
        assert!(
            message.contains("--database-pooler transaction needs a postgres:// database URL"),
            "{message}"
        );
        assert!(!std::path::Path::new("/tmp/never-created-pooler.db").exists());
        let error = Cli::try_parse_from(["orderflow", "--database-pooler", "session", "migrate"])
            .unwrap_err()
            .to_string();
        assert!(error.contains("--database-pooler"), "{error}");
        assert_eq!(
            Cli::try_parse_from(["orderflow", "migrate"])
                .unwrap()
                .global
                .database_pooler,
            DatabasePooler::None
        );
    }

    #[test]
    fn dsql_region_turns_iam_tokens_on_in_the_dsql_profile_only() {
        let parse = |args: &[&str]| Cli::try_parse_from([&["orderflow"], args, &["migrate"]].concat()).unwrap();
        let url = "postgres://admin@abc.dsql.us-east-1.on.aws/postgres";
        let cli = parse(&[
            "--database-url",
            url,
            "--database-profile",
            "dsql",
            "--dsql-region",
            "us-east-1",
        ]);
        match cli.global.connect_options().unwrap().dsql_auth {
            Some(DsqlAuth::Iam(settings)) => {
                assert_eq!(settings.region, "us-east-1");
                assert_eq!(settings.token_ttl, Duration::from_secs(15 * 60));
            }
            other => panic!("{other:?}"),
        }
        let cli = parse(&[
            "--database-profile",
            "dsql",
            "--dsql-region",
            "us-east-1",
            "--dsql-token-ttl",
            "1h",
        ]);
        match cli.global.connect_options().unwrap().dsql_auth {
            Some(DsqlAuth::Iam(settings)) => assert_eq!(settings.token_ttl, Duration::from_secs(3600)),
            other => panic!("{other:?}"),
        }
        assert!(
            parse(&["--database-profile", "dsql"])
                .global
                .connect_options()
                .unwrap()
                .dsql_auth
                .is_none()
        );
        let error = parse(&["--database-url", url, "--dsql-region", "us-east-1"])
            .global
            .connect_options()
            .unwrap_err()
            .to_string();
        assert!(
            error.contains("--dsql-region") && error.contains("--database-profile dsql"),
            "{error}"
        );
        for ttl in ["30s", "8d"] {
            let error = Cli::try_parse_from(["orderflow", "--dsql-token-ttl", ttl, "migrate"])
                .unwrap_err()
                .to_string();
            assert!(
                error.contains("--dsql-token-ttl") && error.contains("1m to 7d"),
                "{error}"
            );
        }
    }

    #[test]
    fn default_database_is_embedded() {
        let cli = Cli::try_parse_from(["orderflow", "--data-dir", "/tmp/x"]).unwrap();
        assert_eq!(cli.global.database_url(), "sqlite:///tmp/x/orderflow.db");
        assert!(cli.command.is_none());
    }

    #[tokio::test]
    async fn secret_is_generated_once() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("jwt-secret");
        let first = load_or_create_secret(&path).unwrap();
        let second = load_or_create_secret(&path).unwrap();
        assert_eq!(format!("{first:?}"), "Secret(***)");
        let auth = crate::http::Authenticator::hs256(&first);
        let token = auth.issue("x", &[], Duration::from_secs(60)).unwrap();
        assert!(crate::http::Authenticator::hs256(&second).verify(&token).await.is_ok());
    }
}
