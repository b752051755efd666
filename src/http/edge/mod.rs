//! The front door: everything a request passes before a handler sees it, and every response
//! passes on the way out. It is what API Gateway + CloudFront gave the source system, built in
//! so orderflow is safe to expose directly or behind any proxy or CDN:
//!
//! - [`rate_limit`]: per principal (client IP when anonymous) and per route class → 429 with
//!   `Retry-After` and `RateLimit-*` headers;
//! - [`overload`]: a bound on requests in flight and a handler timeout → 503 with `Retry-After`
//!   at once instead of a pile-up; a bound on reading a slow request body → 408 (enforced by the
//!   JSON extractor, which knows when it reads the body);
//! - [`headers`]: security headers and a `no-store` default on every response, CORS, response
//!   compression (with ETags kept honest per encoding).
//!
//! The bound on waiting for a database connection is the pool's acquire timeout
//! (`--db-acquire-timeout`), which the store maps to the same 503.

pub mod headers;
pub mod overload;
pub mod rate_limit;
pub mod server;

use std::sync::Arc;
use std::time::Duration;

use axum::Router;
use axum::http::Method;
use tokio::sync::Semaphore;

pub use rate_limit::{Rate, RateLimits, RouteClass};

/// What the edge enforces. `Default` is the production default.
#[derive(Clone, Debug)]
pub struct EdgeSettings {
    /// Requests per principal per route class; `None` turns a class's limit off.
    pub rate_limits: RateLimits,
    /// Most requests handled at once (health probes excepted); more get 503 at once.
    pub max_in_flight: usize,
    /// Longest a handler may take (a long-poll gets its requested wait on top).
    pub handler_timeout: Duration,
    /// Longest a client may take to send its request body.
    pub body_timeout: Duration,
    /// Longest a client may take to send a request's headers (slowloris defence).
    pub header_timeout: Duration,
    /// `Cache-Control` of public catalog reads.
    pub catalog_cache_control: String,
    /// `Strict-Transport-Security` value; empty sends none.
    pub hsts: String,
    /// Cross-origin access from browsers; off when no origin is allowed.
    pub cors: CorsSettings,
    /// How many proxies in front of orderflow append to `X-Forwarded-For`: 0 trusts none and
    /// uses the connection's peer address as the client IP.
    pub trusted_proxy_hops: usize,
}

impl Default for EdgeSettings {
    fn default() -> Self {
        Self {
            rate_limits: RateLimits::default(),
            max_in_flight: 1024,
            handler_timeout: Duration::from_secs(15),
            body_timeout: Duration::from_secs(10),
            header_timeout: Duration::from_secs(10),
            catalog_cache_control: DEFAULT_CATALOG_CACHE_CONTROL.into(),
            hsts: DEFAULT_HSTS.into(),
            cors: CorsSettings::default(),
            trusted_proxy_hops: 0,
        }
    }
}

/// Catalog reads may be served from a cache for a few seconds and refreshed in the background;
/// stock shown on a product page is advisory (checkout re-checks it under a lock).
pub const DEFAULT_CATALOG_CACHE_CONTROL: &str = "public, max-age=5, stale-while-revalidate=30";
/// Two years, subdomains included: browsers ignore it over plain http (local development).
pub const DEFAULT_HSTS: &str = "max-age=63072000; includeSubDomains";

/// Which browser origins may call the API, and how.
#[derive(Clone, Debug)]
pub struct CorsSettings {
    /// Allowed origins (`https://shop.example`), or `*` for any. Empty: CORS off.
    pub allowed_origins: Vec<String>,
    pub allowed_methods: Vec<Method>,
    /// Request headers a browser may send (lower-case names).
    pub allowed_headers: Vec<String>,
    /// How long a browser may cache a preflight answer.
    pub max_age: Duration,
}

impl Default for CorsSettings {
    fn default() -> Self {
        Self {
            allowed_origins: Vec::new(),
            allowed_methods: vec![Method::GET, Method::POST, Method::PATCH],
            allowed_headers: [
                "authorization",
                "content-type",
                "idempotency-key",
                "if-none-match",
                "prefer",
                "x-correlation-id",
            ]
            .map(String::from)
            .to_vec(),
            max_age: Duration::from_secs(600),
        }
    }
}

/// The edge's live state: the settings plus the rate limiters and the in-flight bound.
pub struct Edge {
    pub settings: EdgeSettings,
    limiters: rate_limit::Limiters,
    in_flight: Arc<Semaphore>,
}

impl Edge {
    pub fn new(settings: EdgeSettings) -> Self {
        Self {
            limiters: rate_limit::Limiters::new(&settings.rate_limits),
            in_flight: Arc::new(Semaphore::new(settings.max_in_flight.max(1))),
            settings,
        }
    }
}

impl Default for Edge {
    fn default() -> Self {
        Self::new(EdgeSettings::default())
    }
}

/// Wraps the routed API in the edge layers. Outermost first: security headers and the
/// `no-store` default (so every answer carries them, edge refusals included), CORS (answers
/// preflights before anything else runs), compression, rate limits, the in-flight bound, the
/// handler and body timeouts.
pub fn wrap<S>(router: Router<S>, edge: Arc<Edge>, auth: Arc<crate::http::Authenticator>) -> Router<S>
where
    S: Clone + Send + Sync + 'static,
{
    let settings = &edge.settings;
    let router = router
        .layer(axum::middleware::from_fn_with_state(
            edge.clone(),
            overload::handler_timeout,
        ))
        .layer(axum::middleware::from_fn_with_state(
            settings.body_timeout,
            overload::body_timeout,
        ))
        .layer(axum::middleware::from_fn_with_state(
            edge.clone(),
            overload::bound_in_flight,
        ))
        .layer(axum::middleware::from_fn_with_state(
            (edge.clone(), auth),
            rate_limit::middleware,
        ))
        .layer(tower_http::compression::CompressionLayer::new())
        .layer(axum::middleware::from_fn(headers::etag_per_encoding));
    let router = match headers::cors(&settings.cors) {
        Some(cors) => router.layer(cors),
        None => router,
    };
    router.layer(axum::middleware::from_fn_with_state(edge.clone(), headers::security))
}
