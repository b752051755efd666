//! `/ops`: the operators' dashboard — queues, oldest job ages, dead jobs with replay buttons,
//! firing alarms and recent orders, refreshing itself.
//!
//! A browser navigation cannot carry a bearer token, so the page is a public shell with no data
//! in it; its script (`src/http/ops/app.js`) asks the operator for an admin token (kept in the
//! tab's `sessionStorage`, or taken once from `#token=…` in the address) and reads the admin API
//! with it (`/admin/queues`, `/admin/jobs?state=dead`, `/admin/orders`, `/health/ready`, and
//! `/admin/reports/sales` for its sales chart, drawn as inline SVG by the script itself). The
//! script and styles are served from here too, so the page's own Content-Security-Policy
//! ([`OPS_CSP`]) allows nothing but this origin's script, styles and API calls: no inline code,
//! no CDN, nothing to load from elsewhere.

use axum::http::{HeaderValue, header};
use axum::response::{IntoResponse, Response};
use utoipa_axum::router::OpenApiRouter;
use utoipa_axum::routes;

use super::AppState;

const PAGE: &str = include_str!("ops/index.html");
const SCRIPT: &str = include_str!("ops/app.js");
const STYLE: &str = include_str!("ops/app.css");

/// What `/ops` may load: its script and styles from this origin, and calls to this origin's API.
pub const OPS_CSP: &str = "default-src 'none'; script-src 'self'; style-src 'self'; connect-src 'self'; \
     base-uri 'none'; form-action 'none'; frame-ancestors 'none'";

pub fn routes() -> OpenApiRouter<AppState> {
    OpenApiRouter::default()
        .routes(routes!(page))
        .routes(routes!(script))
        .routes(routes!(style))
}

fn asset(content_type: &'static str, body: &'static str) -> Response {
    // Revalidated on every load: a new release's page never runs with an old script.
    (
        [
            (header::CONTENT_TYPE, content_type),
            (header::CACHE_CONTROL, "no-cache"),
        ],
        body,
    )
        .into_response()
}

/// The ops dashboard
///
/// The operators' page: queues, oldest ready job ages, dead jobs with replay buttons, firing
/// alarms and recent orders, refreshing itself. The page is public and holds no data; its
/// script asks for an admin token and reads the admin API with it.
#[utoipa::path(
    get,
    path = "/ops",
    operation_id = "getOpsDashboard",
    tag = "ops",
    responses((status = 200, description = "The dashboard page.", content_type = "text/html", body = String, headers(
        ("Content-Security-Policy" = String, description = "Only this origin's script, styles and API."),
    ))),
)]
async fn page() -> Response {
    let mut response = asset("text/html; charset=utf-8", PAGE);
    response
        .headers_mut()
        .insert(header::CONTENT_SECURITY_POLICY, HeaderValue::from_static(OPS_CSP));
    response
}

/// The ops dashboard's script
///
/// Reads the admin API with the operator's token and renders the dashboard.
#[utoipa::path(
    get,
    path = "/ops/app.js",
    operation_id = "getOpsScript",
    tag = "ops",
    responses((status = 200, description = "The script.", content_type = "text/javascript", body = String)),
)]
async fn script() -> Response {
    asset("text/javascript; charset=utf-8", SCRIPT)
}

/// The ops dashboard's styles
#[utoipa::path(
    get,
    path = "/ops/app.css",
    operation_id = "getOpsStyles",
    tag = "ops",
    responses((status = 200, description = "The style sheet.", content_type = "text/css", body = String)),
)]
async fn style() -> Response {
    asset("text/css; charset=utf-8", STYLE)
}
