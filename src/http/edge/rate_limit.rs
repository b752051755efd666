//! Rate limits per principal and route class (GCRA, via `governor`): a verified bearer token's
//! subject, else the client IP. Each class has its own budget, so a burst of catalog browsing
//! cannot use up a customer's checkout budget, and one noisy client cannot slow the others.
//!
//! Every limited response carries the IETF draft headers `RateLimit-Limit`,
//! `RateLimit-Remaining`, `RateLimit-Reset` and `RateLimit-Policy`; a refusal is 429 with
//! `Retry-After`. Health probes are never limited.

use std::net::{IpAddr, SocketAddr};
use std::num::NonZeroU32;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use axum::extract::{ConnectInfo, Request, State};
use axum::http::{HeaderMap, HeaderValue, Method, header};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use governor::clock::{Clock, DefaultClock};
use governor::middleware::StateInformationMiddleware;
use governor::state::keyed::DefaultKeyedStateStore;
use governor::{Quota, RateLimiter};

use super::Edge;
use crate::http::Authenticator;
use crate::http::auth::Principal;
use crate::http::error::ApiError;

/// The budgets requests are counted against.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum RouteClass {
    /// Public catalog reads, the API document and reference page, unknown routes.
    Catalog,
    /// A principal's own orders and customer record; the event feed.
    Reads,
    /// Placing and cancelling orders, creating customers.
    Writes,
    /// Everything under `/admin` and catalog changes.
    Admin,
}

impl RouteClass {
    pub const ALL: [RouteClass; 4] = [Self::Catalog, Self::Reads, Self::Writes, Self::Admin];

    pub fn name(self) -> &'static str {
        match self {
            Self::Catalog => "catalog",
            Self::Reads => "reads",
            Self::Writes => "writes",
            Self::Admin => "admin",
        }
    }

    /// The class of a request, or `None` for requests that are never limited (health probes,
    /// metrics scrapes).
    pub fn of(method: &Method, path: &str) -> Option<Self> {
        let read = method == Method::GET || method == Method::HEAD;
        let class = if path.starts_with("/health/") || path == "/metrics" {
            return None;
        } else if path == "/admin" || path.starts_with("/admin/") {
            Self::Admin
        } else if path == "/products" || path.starts_with("/products/") {
            if read { Self::Catalog } else { Self::Admin }
        } else if path == "/orders"
            || path.starts_with("/orders/")
            || path == "/customers"
            || path.starts_with("/customers/")
            || path == "/events"
        {
            if read { Self::Reads } else { Self::Writes }
        } else {
            Self::Catalog
        };
        Some(class)
    }
}

/// A budget: `count` requests per `period`, of which all may come in one burst.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Rate {
    pub count: NonZeroU32,
    pub period: Duration,
}

impl Rate {
    /// Parses `100/s`, `600/m`, `5000/h`; `off` means no limit (`None`).
    pub fn parse(text: &str) -> Result<Option<Rate>, String> {
        let text = text.trim();
        if text.eq_ignore_ascii_case("off") {
            return Ok(None);
        }
        let usage = || format!("`{text}` is not a rate like 100/s, 600/m or 5000/h (or `off`)");
        let (count, unit) = text.split_once('/').ok_or_else(usage)?;
        let count: NonZeroU32 = count.trim().parse().map_err(|_| usage())?;
        let period = match unit.trim() {
            "s" => Duration::from_secs(1),
            "m" => Duration::from_secs(60),
            "h" => Duration::from_secs(3600),
            _ => return Err(usage()),
        };
        Ok(Some(Rate { count, period }))
    }

    fn quota(self) -> Quota {
        let per_cell = self.period / self.count.get();
        Quota::with_period(per_cell.max(Duration::from_nanos(1)))
            .expect("a positive period")
            .allow_burst(self.count)
    }

    fn window_secs(self) -> u64 {
        self.period.as_secs().max(1)
    }
}

impl std::fmt::Display for Rate {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let unit = match self.period.as_secs() {
            1 => "s",
            60 => "m",
            _ => "h",
        };
        write!(f, "{}/{unit}", self.count)
    }
}

/// One budget per route class; `None` = unlimited.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RateLimits {
    pub catalog: Option<Rate>,
    pub reads: Option<Rate>,
    pub writes: Option<Rate>,
    pub admin: Option<Rate>,
}

impl RateLimits {
    /// No limits at all (benchmarks, tests of other behaviour).
    pub fn off() -> Self {
        Self {
            catalog: None,
            reads: None,
            writes: None,
            admin: None,
        }
    }

    pub fn get(&self, class: RouteClass) -> Option<Rate> {
        match class {
            RouteClass::Catalog => self.catalog,
            RouteClass::Reads => self.reads,
            RouteClass::Writes => self.writes,
            RouteClass::Admin => self.admin,
        }
    }
}

impl Default for RateLimits {
    /// Generous for a person or a store front-end, tight enough to stop a script.
    fn default() -> Self {
        let rate = |count: u32| {
            Some(Rate {
                count: NonZeroU32::new(count).expect("positive"),
                period: Duration::from_secs(1),
            })
        };
        Self {
            catalog: rate(100),
            reads: rate(50),
            writes: rate(20),
            admin: rate(50),
        }
    }
}

type KeyedLimiter = RateLimiter<String, DefaultKeyedStateStore<String>, DefaultClock, StateInformationMiddleware>;

/// The live limiters, one per limited class.
pub(super) struct Limiters {
    by_class: Vec<(RouteClass, Rate, KeyedLimiter)>,
    clock: DefaultClock,
    checks: AtomicU64,
}

/// Forget idle keys every this many checks, so memory follows the active clients.
const PRUNE_EVERY: u64 = 4096;

impl Limiters {
    pub(super) fn new(limits: &RateLimits) -> Self {
        let by_class = RouteClass::ALL
            .into_iter()
            .filter_map(|class| {
                let rate = limits.get(class)?;
                let limiter = RateLimiter::keyed(rate.quota()).with_middleware::<StateInformationMiddleware>();
                Some((class, rate, limiter))
            })
            .collect();
        Self {
            by_class,
            clock: DefaultClock::default(),
            checks: AtomicU64::new(0),
        }
    }

    fn limits(&self, class: RouteClass) -> bool {
        self.by_class.iter().any(|(c, _, _)| *c == class)
    }

    /// Counts one request of `key` against `class`: the headers to send, or the refusal.
    fn check(&self, class: RouteClass, key: &str) -> Option<Result<RateHeaders, ApiError>> {
        let (_, rate, limiter) = self.by_class.iter().find(|(c, _, _)| *c == class)?;
        if self.checks.fetch_add(1, Ordering::Relaxed) % PRUNE_EVERY == PRUNE_EVERY - 1 {
            for (_, _, limiter) in &self.by_class {
                limiter.retain_recent();
            }
        }
        let per_cell = rate.period / rate.count.get();
        Some(match limiter.check_key(&key.to_string()) {
            Ok(snapshot) => {
                let remaining = snapshot.remaining_burst_capacity();
                let used = rate.count.get().saturating_sub(remaining);
                Ok(RateHeaders {
                    rate: *rate,
                    remaining,
                    reset_secs: ceil_secs(per_cell * used),
                })
            }
            Err(not_until) => {
                let wait = not_until.wait_time_from(self.clock.now());
                let retry_after = ceil_secs(wait).max(1);
                let headers = RateHeaders {
                    rate: *rate,
                    remaining: 0,
                    reset_secs: retry_after,
                };
                let mut error = ApiError::rate_limited(class.name(), retry_after);
                error.extend_headers(headers.to_headers());
                Err(error)
            }
        })
    }
}

fn ceil_secs(duration: Duration) -> u64 {
    duration.as_secs() + u64::from(duration.subsec_nanos() > 0)
}

#[derive(Debug)]
struct RateHeaders {
    rate: Rate,
    remaining: u32,
    reset_secs: u64,
}

impl RateHeaders {
    fn to_headers(&self) -> HeaderMap {
        let mut headers = HeaderMap::new();
        headers.insert("ratelimit-limit", HeaderValue::from(self.rate.count.get()));
        headers.insert("ratelimit-remaining", HeaderValue::from(self.remaining));
        headers.insert("ratelimit-reset", HeaderValue::from(self.reset_secs));
        let policy = format!("{};w={}", self.rate.count, self.rate.window_secs());
        headers.insert("ratelimit-policy", HeaderValue::from_str(&policy).expect("ascii"));
        headers
    }
}

/// The rate-limit middleware. A valid bearer token is verified here once and the principal
/// handed to the handler (see [`Principal`]'s extractor), so limits follow the identity, not
/// the token string: minting fresh garbage tokens does not escape the client-IP budget.
pub async fn middleware(
    State((edge, auth)): State<(Arc<Edge>, Arc<Authenticator>)>,
    mut request: Request,
    next: Next,
) -> Response {
    let Some(class) = RouteClass::of(request.method(), request.uri().path()) else {
        return next.run(request).await;
    };
    if !edge.limiters.limits(class) {
        return next.run(request).await;
    }
    let principal = match bearer_token(request.headers()) {
        Some(token) => auth.verify(token).await.ok(),
        None => None,
    };
    let key = match &principal {
        Some(principal) => format!("sub:{}", principal.subject),
        None => format!("ip:{}", client_ip(&request, edge.settings.trusted_proxy_hops)),
    };
    if let Some(principal) = principal {
        request.extensions_mut().insert(VerifiedPrincipal(principal));
    }
    match edge.limiters.check(class, &key) {
        None => next.run(request).await,
        Some(Err(refusal)) => refusal.into_response(),
        Some(Ok(rate_headers)) => {
            let mut response = next.run(request).await;
            response.headers_mut().extend(rate_headers.to_headers());
            response
        }
    }
}

/// A principal whose token the edge already verified for this request.
#[derive(Clone, Debug)]
pub struct VerifiedPrincipal(pub Principal);

fn bearer_token(headers: &HeaderMap) -> Option<&str> {
    let value = headers.get(header::AUTHORIZATION)?.to_str().ok()?;
    value
        .strip_prefix("Bearer ")
        .or_else(|| value.strip_prefix("bearer "))
        .map(str::trim)
}

/// The client's address: the peer, or with `hops` trusted proxies in front, the address the
/// outermost trusted proxy saw (the `hops`-th entry from the right of `X-Forwarded-For`).
pub fn client_ip(request: &Request, hops: usize) -> String {
    let peer = request
        .extensions()
        .get::<ConnectInfo<SocketAddr>>()
        .map(|ConnectInfo(address)| address.ip());
    if hops > 0 {
        let forwarded: Vec<IpAddr> = request
            .headers()
            .get_all("x-forwarded-for")
            .iter()
            .filter_map(|value| value.to_str().ok())
            .flat_map(|value| value.split(','))
            .filter_map(|entry| entry.trim().parse().ok())
            .collect();
        if let Some(ip) = forwarded.len().checked_sub(hops).and_then(|index| forwarded.get(index)) {
            return ip.to_string();
        }
    }
    peer.map_or_else(|| "unknown".to_string(), |ip| ip.to_string())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rates_parse() {
        let rate = Rate::parse("600/m").unwrap().unwrap();
        assert_eq!(rate.count.get(), 600);
        assert_eq!(rate.period, Duration::from_secs(60));
        assert_eq!(rate.to_string(), "600/m");
        assert_eq!(Rate::parse("off").unwrap(), None);
        for bad in ["", "10", "0/s", "-1/s", "10/d", "x/s"] {
            assert!(Rate::parse(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn classes() {
        assert_eq!(RouteClass::of(&Method::GET, "/products"), Some(RouteClass::Catalog));
        assert_eq!(RouteClass::of(&Method::PATCH, "/products/x"), Some(RouteClass::Admin));
        assert_eq!(RouteClass::of(&Method::POST, "/orders"), Some(RouteClass::Writes));
        assert_eq!(
            RouteClass::of(&Method::POST, "/orders/x/cancel"),
            Some(RouteClass::Writes)
        );
        assert_eq!(RouteClass::of(&Method::GET, "/orders/x"), Some(RouteClass::Reads));
        assert_eq!(RouteClass::of(&Method::GET, "/events"), Some(RouteClass::Reads));
        assert_eq!(RouteClass::of(&Method::GET, "/admin/queues"), Some(RouteClass::Admin));
        assert_eq!(RouteClass::of(&Method::GET, "/health/ready"), None);
        assert_eq!(RouteClass::of(&Method::GET, "/docs"), Some(RouteClass::Catalog));
    }

    #[test]
    fn a_burst_past_the_budget_is_refused_per_key() {
        let limits = RateLimits {
            writes: Some(Rate {
                count: NonZeroU32::new(3).unwrap(),
                period: Duration::from_secs(60),
            }),
            ..RateLimits::off()
        };
        let limiters = Limiters::new(&limits);
        for expected_remaining in [2, 1, 0] {
            let headers = limiters.check(RouteClass::Writes, "a").unwrap().unwrap();
            assert_eq!(headers.remaining, expected_remaining);
        }
        let refusal = limiters.check(RouteClass::Writes, "a").unwrap().unwrap_err();
        assert_eq!(refusal.status(), 429);
        assert!(limiters.check(RouteClass::Writes, "b").unwrap().is_ok());
        assert!(limiters.check(RouteClass::Catalog, "a").is_none());
    }
}
