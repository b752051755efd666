//! The `orderflow` command: wiring configuration, store and HTTP together, and the operator
//! commands (`token`, `migrate`, `seed`, `audit`).

use std::process::ExitCode;
use std::sync::Arc;

use anyhow::Context;
use clap::Parser;
use tokio::net::TcpListener;

use crate::config::{AuditArgs, Cli, Command, GlobalArgs, ServeArgs, TokenArgs};
use crate::http::{AppState, Authenticator};
use crate::store::{self, Store, redact_url};
use crate::workflow::checkout::CheckoutSettings;
use crate::{http, seed, telemetry};

/// Parses the command line and runs the command. `orderflow` alone means `orderflow serve`.
pub async fn run() -> ExitCode {
    let cli = Cli::parse();
    telemetry::init(cli.global.log_format);
    let result = match cli.command.unwrap_or(Command::Serve) {
        Command::Serve => serve(&cli.global, cli.serve).await,
        Command::Token(args) => token(&cli.global, args),
        Command::Migrate => migrate(&cli.global).await,
        Command::Seed => seed_catalog(&cli.global).await,
        Command::Audit(args) => return audit(&cli.global, args).await,
    };
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
    let secret = global.jwt_secret()?;
    let store = open_store(global).await?;
    let checkout = CheckoutSettings {
        currency: global.currency,
        payment_max_attempts: args.payment_max_attempts,
    };
    if !args.no_seed && store.is_empty().await? {
        let added = seed::load_sample_catalog(store.as_ref(), checkout.currency).await?;
        tracing::info!(added, "loaded the sample catalog into the empty database");
    }
    let state = AppState {
        store,
        auth: Arc::new(Authenticator::hs256(&secret)),
        checkout: Arc::new(checkout),
        body_limit: args.body_limit,
    };
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
        tracing::info!("shutting down: finishing in-flight requests");
        let _ = signalled_tx.send(true);
    };
    let server = http::serve(listener, state, shutdown);
    let deadline = async move {
        let mut signalled = signalled_rx;
        let _ = signalled.wait_for(|s| *s).await;
        tokio::time::sleep(args.shutdown_timeout).await;
    };
    tokio::select! {
        result = server => result.context("serving HTTP")?,
        () = deadline => tracing::warn!("shutdown timeout reached with requests still in flight"),
    }
    tracing::info!("stopped");
    Ok(())
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

fn token(global: &GlobalArgs, args: TokenArgs) -> anyhow::Result<()> {
    if args.sub.trim().is_empty() {
        anyhow::bail!("--sub must not be empty");
    }
    let auth = Authenticator::hs256(&global.jwt_secret()?);
    println!("{}", auth.issue(&args.sub, &args.roles, args.ttl)?);
    Ok(())
}

async fn migrate(global: &GlobalArgs) -> anyhow::Result<()> {
    open_store(global).await?;
    println!(
        "migrations applied to {}",
        redact_url(&global.database_url())
    );
    Ok(())
}

async fn seed_catalog(global: &GlobalArgs) -> anyhow::Result<()> {
    let store = open_store(global).await?;
    let added = seed::load_sample_catalog(store.as_ref(), global.currency).await?;
    println!("sample catalog: {added} product(s) added");
    Ok(())
}

async fn audit(global: &GlobalArgs, args: AuditArgs) -> ExitCode {
    let report = match open_store(global).await {
        Ok(store) => store.audit().await.map_err(anyhow::Error::from),
        Err(error) => Err(error),
    };
    match report {
        Ok(report) => {
            if args.json {
                println!(
                    "{}",
                    serde_json::to_string_pretty(&report).expect("reports serialize")
                );
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
