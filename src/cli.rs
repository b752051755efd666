//! The `orderflow` command: wiring configuration, store and HTTP together, and the operator
//! commands (`token`, `migrate`, `seed`, `audit`).

use std::process::ExitCode;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use clap::Parser;
use tokio::net::TcpListener;

use crate::adapters::notify::smtp::{SmtpNotifier, SmtpPassword, SmtpSettings};
use crate::adapters::notify::{FileNotifier, Notifier};
use crate::adapters::payment::intents::PaymentProvider;
use crate::adapters::payment::sandbox::Sandbox;
use crate::adapters::payment::sandbox_server::{SandboxServerSettings, serve_sandbox};
use crate::adapters::payment::stripe::{StripeClient, StripeSettings};
use crate::clock;
use crate::config::{
    AuditArgs, Cli, Command, EventsAction, GlobalArgs, JobsAction, Mode, NotifierKind, PaymentProviderKind,
    SandboxProviderArgs, ServeArgs, TokenArgs,
};
use crate::http::auth::JwksSource;
use crate::http::edge::Edge;
use crate::http::{AppState, Authenticator};
use crate::monitoring::metrics::CancelReason;
use crate::monitoring::webhook::{DELIVER_ALERT, WebhookSecret, WebhookStep};
use crate::monitoring::{Metrics, Monitoring, alarms};
use crate::queue::{QueueSettings, Runner};
use crate::store::jobs::{JobFilter, ReplaySelector};
use crate::store::sandbox::SandboxBooks;
use crate::store::{self, Store, redact_url};
use crate::workflow::SEND_CANCELLATION;
use crate::workflow::checkout::CheckoutSettings;
use crate::workflow::idempotency::IdempotencySettings;
use crate::workflow::steps::{Saga, SagaSettings, expire_reservations};
use crate::{http, seed, telemetry};

/// Parses the command line and runs the command. `orderflow` alone means `orderflow serve`.
pub async fn run() -> ExitCode {
    let cli = Cli::parse();
    let telemetry = match telemetry::init(&cli.global.telemetry_settings()) {
        Ok(telemetry) => telemetry,
        Err(error) => {
            eprintln!("orderflow: {error:#}");
            return ExitCode::from(2);
        }
    };
    let result = match cli.command.unwrap_or(Command::Serve) {
        Command::Serve => serve(&cli.global, cli.serve).await,
        Command::Token(args) => token(&cli.global, &cli.serve, args),
        Command::Migrate => migrate(&cli.global).await,
        Command::Seed => seed_catalog(&cli.global).await,
        Command::Audit(args) => {
            let code = audit(&cli.global, &cli.serve, args).await;
            telemetry.shutdown().await;
            return code;
        }
        Command::Jobs { action } => jobs(&cli.global, action).await,
        Command::Events { action } => events(&cli.global, &cli.serve, action).await,
        Command::SandboxProvider(args) => sandbox_provider(&cli.global, args).await,
    };
    telemetry.shutdown().await;
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(error) => {
            eprintln!("orderflow: {error:#}");
            ExitCode::from(2)
        }
    }
}

async fn open_store(global: &GlobalArgs) -> anyhow::Result<Arc<dyn Store>> {
    let url = global.database_url();
    store::connect(&url, &global.connect_options()?)
        .await
        .with_context(|| format!("opening the database {}", redact_url(&url)))
}

async fn serve(global: &GlobalArgs, args: ServeArgs) -> anyhow::Result<()> {
    let auth = Arc::new(args.auth.authenticator(global)?);
    if args.mode != Mode::Worker {
        load_signing_keys(&auth).await?;
    }
    let monitoring = Monitoring {
        metrics: Metrics::for_region(global.telemetry_settings().region.as_deref()),
        alarms: Arc::new(args.monitoring.alarm_settings()?),
        access: Arc::new(args.monitoring.metrics_access()),
    };
    if monitoring.alarms.stuck_unpaid <= args.reservation_ttl {
        tracing::warn!(
            "--alarm-stuck-unpaid is not longer than --reservation-ttl: orders waiting for payment within \
             their reservation will fire orders_stuck_unpaid"
        );
    }
    let event_settings = Arc::new(args.events.settings()?);
    let stripe_webhooks = Arc::new(http::stripe_webhooks::StripeWebhookSettings::new(
        args.stripe_webhook_secret.clone(),
    )?);
    let store = open_store(global).await?;
    let checkout = CheckoutSettings {
        currency: global.currency,
        payment_max_attempts: args.max_attempts,
        region: global.telemetry_settings().region,
    };
    let saga_settings = SagaSettings {
        max_attempts: args.max_attempts,
        compensation_max_attempts: args.compensation_max_attempts,
        capture: args.capture,
        fulfilment: args.fulfilment,
    };
    if !args.no_seed && args.mode != Mode::Worker && store.is_empty().await? {
        let added = seed::load_sample_catalog(store.as_ref(), checkout.currency).await?;
        tracing::info!(added, "loaded the sample catalog into the empty database");
    }
    let (stop_tx, stop_rx) = tokio::sync::watch::channel(false);
    let mut tasks = tokio::task::JoinSet::new();

    if args.mode != Mode::Api {
        let payments = payment_provider(&args, &store)?;
        let notifier = notifier(global, &args)?;
        let saga = Arc::new(Saga {
            store: store.clone(),
            payments,
            notifier,
            settings: saga_settings.clone(),
            metrics: monitoring.metrics.clone(),
        });
        let queue = QueueSettings {
            lease: args.job_lease,
            backoff_base: args.job_backoff,
            backoff_max: args.job_backoff_max,
            poll_interval: args.job_poll,
            concurrency: args.job_concurrency as usize,
            retention: args.job_retention,
            max_lease_expiries: args.max_lease_expiries,
        };
        let mut runner = Runner::new(store.clone(), queue);
        runner.set_metrics(monitoring.metrics.clone());
        saga.register(&mut runner);
        // Alert deliveries run where the signing secret is configured.
        if let Some(secret) = &args.monitoring.alert_webhook_secret {
            let step = WebhookStep::new(
                store.clone(),
                WebhookSecret::new(secret.clone()),
                args.monitoring.alert_webhook_timeout,
                monitoring.metrics.clone(),
            )?;
            runner.register(DELIVER_ALERT, Arc::new(step));
        }
        tasks.spawn(Arc::new(runner).run(stop_rx.clone()));
        tasks.spawn(crate::events::run(
            store.clone(),
            (*event_settings).clone(),
            monitoring.metrics.clone(),
            stop_rx.clone(),
        ));
        tasks.spawn(alarms::run(
            store.clone(),
            (*monitoring.alarms).clone(),
            stop_rx.clone(),
        ));
        tasks.spawn(crate::workflow::idempotency::run(
            store.clone(),
            IdempotencySettings::with_retention(args.idempotency_retention),
            stop_rx.clone(),
        ));
        tasks.spawn(expire_reservations_periodically(
            store.clone(),
            saga_settings.clone(),
            args.reservation_ttl,
            monitoring.metrics.clone(),
            stop_rx.clone(),
        ));
        tracing::info!("job workers started");
    }

    let state = AppState {
        store,
        auth,
        checkout: Arc::new(checkout),
        saga: Arc::new(saga_settings),
        body_limit: args.body_limit,
        edge: Arc::new(Edge::new(args.edge.settings())),
        monitoring,
        events: event_settings.clone(),
        stripe_webhooks,
    };
    if let Some(address) = args.monitoring.metrics_listen {
        let listener = TcpListener::bind(address)
            .await
            .with_context(|| format!("listening for metrics scrapes on {address}"))?;
        println!("metrics at http://{}/metrics", listener.local_addr()?);
        let mut stop = stop_rx.clone();
        let stopped = async move {
            let _ = stop.wait_for(|stop| *stop).await;
        };
        let metrics_server = http::serve_metrics(listener, state.clone(), stopped);
        tasks.spawn(async move {
            if let Err(error) = metrics_server.await {
                tracing::error!(%error, "the metrics listener failed");
            }
        });
    }

    if args.mode == Mode::Worker {
        println!(
            "orderflow worker running (database: {})",
            redact_url(&global.database_url())
        );
        shutdown_signal().await;
        tracing::info!("shutting down: finishing running steps");
    } else {
        let listener = TcpListener::bind(args.listen)
            .await
            .with_context(|| format!("listening on {}", args.listen))?;
        let address = listener.local_addr()?;
        println!(
            "orderflow listening on http://{address} (database: {})",
            redact_url(&global.database_url())
        );
        println!("  admin token:    orderflow token --sub admin --role admin");
        println!("  customer token: orderflow token --sub <customer-uuid>");
        let (signalled_tx, signalled_rx) = tokio::sync::watch::channel(false);
        let shutdown = async move {
            shutdown_signal().await;
            tracing::info!("shutting down: finishing in-flight requests and steps");
            let _ = signalled_tx.send(true);
        };
        let server = http::serve(listener, state, shutdown);
        let deadline = async {
            let mut signalled = signalled_rx;
            let _ = signalled.wait_for(|s| *s).await;
            tokio::time::sleep(args.shutdown_timeout).await;
        };
        tokio::select! {
            result = server => result.context("serving HTTP")?,
            () = deadline => tracing::warn!("shutdown timeout reached with requests still in flight"),
        }
    }
    let _ = stop_tx.send(true);
    if tokio::time::timeout(args.shutdown_timeout, async {
        while tasks.join_next().await.is_some() {}
    })
    .await
    .is_err()
    {
        tracing::warn!(
            "shutdown timeout reached with steps still running; their leases will expire and they will run again"
        );
    }
    tracing::info!("stopped");
    Ok(())
}

/// The notifier configured for the pipeline.
fn notifier(global: &GlobalArgs, args: &ServeArgs) -> anyhow::Result<Arc<dyn Notifier>> {
    Ok(match args.notifier {
        NotifierKind::File => Arc::new(FileNotifier::new(global.mail_dir(args), args.mail_from.clone())),
        NotifierKind::Smtp => {
            let host = args
                .smtp_host
                .clone()
                .context("--notifier smtp needs --smtp-host (ORDERFLOW_SMTP_HOST)")?;
            let mut settings = SmtpSettings::new(host, args.mail_from.clone());
            settings.tls = args.smtp_tls;
            settings.port = args.smtp_port.unwrap_or(args.smtp_tls.default_port());
            settings.username = args.smtp_username.clone();
            settings.password = args.smtp_password.clone().map(SmtpPassword::new);
            settings.timeout = args.smtp_timeout;
            Arc::new(SmtpNotifier::new(settings).context("SMTP configuration")?)
        }
    })
}

/// The payment provider configured for the pipeline.
fn payment_provider(args: &ServeArgs, store: &Arc<dyn Store>) -> anyhow::Result<Arc<dyn PaymentProvider>> {
    Ok(match args.payment_provider {
        PaymentProviderKind::Sandbox => {
            let books: Arc<dyn SandboxBooks> = store.clone();
            let sandbox = Sandbox::new(books);
            sandbox.set_outage(args.sandbox_outage);
            Arc::new(sandbox)
        }
        PaymentProviderKind::Stripe => Arc::new(stripe_client(args)?),
    })
}

/// `orderflow sandbox-provider`: the sandbox's HTTP API over the configured database.
async fn sandbox_provider(global: &GlobalArgs, args: SandboxProviderArgs) -> anyhow::Result<()> {
    let store = open_store(global).await?;
    let books: Arc<dyn SandboxBooks> = store;
    let sandbox = Arc::new(Sandbox::new(books));
    sandbox.set_outage(!args.no_outage);
    let listener = TcpListener::bind(args.listen)
        .await
        .with_context(|| format!("listening on {}", args.listen))?;
    println!(
        "sandbox payment provider listening on http://{}",
        listener.local_addr()?
    );
    let settings = SandboxServerSettings {
        timeout_answer_delay: args.timeout_answer_delay,
        api_key: args.api_key,
    };
    serve_sandbox(listener, sandbox, settings, shutdown_signal())
        .await
        .context("serving the sandbox provider")
}

/// Cancels unpaid orders past their reservation time, a few times per TTL.
async fn expire_reservations_periodically(
    store: Arc<dyn Store>,
    settings: SagaSettings,
    ttl: Duration,
    metrics: Metrics,
    mut stop: tokio::sync::watch::Receiver<bool>,
) {
    let every = (ttl / 4).clamp(Duration::from_secs(1), Duration::from_secs(60));
    loop {
        match expire_reservations(store.as_ref(), &settings, ttl).await {
            Ok(0) => {}
            Ok(expired) => {
                tracing::info!(expired, "cancelled orders whose reservation expired");
                metrics.orders_cancelled(CancelReason::ReservationExpired, expired as u64);
                metrics.step_enqueued(SEND_CANCELLATION, expired as u64);
            }
            Err(error) => tracing::warn!(%error, "expiring reservations failed"),
        }
        tokio::select! {
            _ = tokio::time::sleep(every) => {}
            _ = stop.wait_for(|stop| *stop) => return,
        }
    }
}

/// Resolves on SIGINT (Ctrl-C) or SIGTERM.
async fn shutdown_signal() {
    let interrupt = async {
        let _ = tokio::signal::ctrl_c().await;
    };
    #[cfg(unix)]
    let terminate = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut signal) => {
                signal.recv().await;
            }
            Err(_) => std::future::pending::<()>().await,
        }
    };
    #[cfg(not(unix))]
    let terminate = std::future::pending::<()>();
    tokio::select! {
        () = interrupt => {},
        () = terminate => {},
    }
}

/// Loads an identity provider's keys before serving: a key file that cannot be used stops the
/// start; an unreachable JWKS URL is logged and tried again when tokens arrive.
async fn load_signing_keys(auth: &Authenticator) -> anyhow::Result<()> {
    let Some(source) = auth.key_source() else {
        return Ok(());
    };
    match (auth.load_keys().await, source) {
        (Ok(0), JwksSource::File(path)) => anyhow::bail!(
            "{} holds no {:?} key: check --jwks-file and --jwt-algorithm",
            path.display(),
            auth.algorithm()
        ),
        (Ok(_), _) => {}
        (Err(error), JwksSource::File(_)) => return Err(error.context("loading --jwks-file")),
        (Err(error), JwksSource::Url(url)) => tracing::warn!(
            %url,
            error = format!("{error:#}"),
            "could not load the token signing keys; trying again when a token arrives"
        ),
    }
    Ok(())
}

fn token(global: &GlobalArgs, serve: &ServeArgs, args: TokenArgs) -> anyhow::Result<()> {
    if args.sub.trim().is_empty() {
        anyhow::bail!("--sub must not be empty");
    }
    let auth = serve.auth.token_issuer(global)?;
    println!("{}", auth.issue(&args.sub, &args.roles, args.ttl)?);
    Ok(())
}

async fn migrate(global: &GlobalArgs) -> anyhow::Result<()> {
    open_store(global).await?;
    println!("migrations applied to {}", redact_url(&global.database_url()));
    Ok(())
}

async fn seed_catalog(global: &GlobalArgs) -> anyhow::Result<()> {
    let store = open_store(global).await?;
    let added = seed::load_sample_catalog(store.as_ref(), global.currency).await?;
    println!("sample catalog: {added} product(s) added");
    Ok(())
}

async fn audit(global: &GlobalArgs, serve: &ServeArgs, args: AuditArgs) -> ExitCode {
    let report = audit_report(global, serve).await;
    match report {
        Ok(report) => {
            if args.json {
                println!("{}", serde_json::to_string_pretty(&report).expect("reports serialize"));
            } else {
                println!("{report}");
            }
            if report.is_clean() {
                ExitCode::SUCCESS
            } else {
                ExitCode::FAILURE
            }
        }
        Err(error) => {
            eprintln!("orderflow audit: {error:#}");
            ExitCode::from(2)
        }
    }
}

/// The store's checks, plus — with `--payment-provider stripe` — the comparison with Stripe's books
/// through its API (`workflow::reconcile`). Stripe unreachable is an error, never a clean report.
async fn audit_report(global: &GlobalArgs, serve: &ServeArgs) -> anyhow::Result<store::AuditReport> {
    let store = open_store(global).await?;
    let mut report = store.audit().await?;
    if serve.payment_provider == PaymentProviderKind::Stripe {
        let stripe = stripe_client(serve)?;
        let violations = crate::workflow::reconcile::reconcile(store.as_ref(), &stripe)
            .await
            .with_context(|| format!("comparing our payments with Stripe's books at {}", stripe.api_base()))?;
        crate::workflow::reconcile::add_to_report(&mut report, violations);
    }
    Ok(report)
}

/// The Stripe client `--stripe-api-base`, `--stripe-secret-key` and `--payment-timeout` describe.
fn stripe_client(args: &ServeArgs) -> anyhow::Result<StripeClient> {
    let key = args
        .stripe_secret_key
        .clone()
        .context("--payment-provider stripe needs --stripe-secret-key (ORDERFLOW_STRIPE_SECRET_KEY)")?;
    StripeClient::new(StripeSettings {
        api_base: args.stripe_api_base.clone(),
        secret_key: key,
        timeout: args.payment_timeout,
    })
}

async fn events(global: &GlobalArgs, serve: &ServeArgs, action: EventsAction) -> anyhow::Result<()> {
    use crate::domain::events::TypePattern;
    use crate::store::events::{EventQuery, ReplayRange};
    let store = open_store(global).await?;
    match action {
        EventsAction::List {
            after,
            event_type,
            limit,
            json,
        } => {
            let types = event_type
                .as_deref()
                .map(TypePattern::parse)
                .transpose()
                .map_err(|e| anyhow::anyhow!("--type: {e}"))?;
            let source = serve.events.events_source.clone();
            let events = store
                .events()
                .events_after(&EventQuery {
                    after,
                    limit: limit.clamp(1, crate::store::events::MAX_BATCH),
                    types,
                })
                .await?;
            if events.is_empty() && !json {
                println!("no events after position {after}");
            }
            for event in events {
                if json {
                    println!("{}", String::from_utf8_lossy(&event.to_json(&source)));
                } else {
                    println!(
                        "{:>8}  {}  {:<26} {:<48} seq {:<3} {}",
                        event.position,
                        event.time.to_rfc3339_opts(chrono::SecondsFormat::Millis, true),
                        event.event_type,
                        event.subject,
                        event.sequence,
                        event.id
                    );
                }
            }
        }
        EventsAction::Replay {
            endpoint,
            from_position,
            to_position,
            since,
            until,
        } => {
            let range = match (from_position, to_position, since, until) {
                (Some(from), Some(to), None, None) if from <= to => ReplayRange::Positions { from, to },
                (None, None, Some(since), Some(until)) if since < until => ReplayRange::Time { since, until },
                _ => {
                    anyhow::bail!("give --from-position N --to-position M (N <= M) or --since T --until U (T before U)")
                }
            };
            if store.events().get_endpoint(endpoint).await?.is_none() {
                anyhow::bail!("no webhook endpoint {endpoint}");
            }
            let queued = store.events().replay_deliveries(endpoint, range, clock::now()).await?;
            println!("queued {queued} event(s) again for endpoint {endpoint}");
        }
    }
    Ok(())
}

async fn jobs(global: &GlobalArgs, action: JobsAction) -> anyhow::Result<()> {
    let store = open_store(global).await?;
    match action {
        JobsAction::List { state, kind, limit } => {
            let filter = JobFilter {
                state: Some(state),
                kind,
                after: None,
                limit: limit.clamp(1, 1000),
            };
            let page = store.list_jobs(&filter).await?;
            if page.items.is_empty() {
                println!("no jobs");
            }
            for job in page.items {
                let order = job.order_id.map(|id| id.to_string()).unwrap_or_else(|| "-".into());
                println!(
                    "{}  {:<18} {:<9} attempts {}/{}  order {}  correlation {}  {}",
                    job.job_id,
                    job.kind,
                    job.state,
                    job.attempts,
                    job.max_attempts,
                    order,
                    job.correlation_id.as_deref().unwrap_or("-"),
                    job.last_error.unwrap_or_default()
                );
            }
        }
        JobsAction::Replay { id, all, kind } => {
            let selector = match (id, all) {
                (Some(id), _) => ReplaySelector::One(id),
                (None, _) => ReplaySelector::AllDead { kind },
            };
            let replayed = store.replay_jobs(&selector, clock::now()).await?;
            println!("replayed {replayed} job(s)");
            if replayed == 0 && matches!(selector, ReplaySelector::One(_)) {
                anyhow::bail!("no dead job with that id");
            }
        }
    }
    Ok(())
}
