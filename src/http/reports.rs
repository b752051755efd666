//! Operator reports: `GET /admin/reports/sales`, what sold per hour or day (admin only), read
//! from the replica when one is configured. Which orders count is the store's rule
//! ([`crate::store::reports`]); the range's rules are the domain's ([`SalesRange`]).

use axum::Json;
use axum::extract::{RawQuery, State};
use axum::response::Response;
use chrono::{DateTime, Utc};
use serde::Serialize;
use utoipa::openapi::path::{Parameter, ParameterIn};
use utoipa::openapi::schema::{KnownFormat, ObjectBuilder, SchemaFormat, Type};
use utoipa::{IntoParams, ToSchema};
use utoipa_axum::router::OpenApiRouter;
use utoipa_axum::routes;

use super::auth::Admin;
use super::error::{ApiError, Problem};
use super::extract::{QueryParams, parameter};
use super::schema;
use super::{AppState, private};
use crate::clock;
use crate::domain::Currency;
use crate::domain::report::{DEFAULT_DAYS, DEFAULT_HOURS, Granularity, MAX_PERIODS, SalesRange, SalesTotals};

pub fn routes() -> OpenApiRouter<AppState> {
    OpenApiRouter::default().routes(routes!(sales))
}

/// One period's sales.
#[derive(Serialize, ToSchema)]
#[schema(as = SalesPeriod)]
struct PeriodView {
    /// The period's first instant (UTC, inclusive).
    period_start: DateTime<Utc>,
    /// The next period's first instant (exclusive).
    period_end: DateTime<Utc>,
    /// Orders accepted in the period whose payment was taken (`paid`, `fulfilled` or `refunded`).
    orders: i64,
    /// Units on those orders.
    units: i64,
    /// The orders' totals.
    #[schema(schema_with = schema::money_ref)]
    gross: serde_json::Number,
    /// Refunds accepted for those orders (settled or still pending), whenever they were made.
    #[schema(schema_with = schema::money_ref)]
    refunded: serde_json::Number,
    /// `gross − refunded`.
    #[schema(schema_with = schema::money_ref)]
    net: serde_json::Number,
}

impl PeriodView {
    fn new(start: DateTime<Utc>, granularity: Granularity, totals: &SalesTotals, currency: Currency) -> Self {
        Self {
            period_start: start,
            period_end: start + granularity.length(),
            orders: totals.orders,
            units: totals.units,
            gross: money(totals.gross_minor, currency),
            refunded: money(totals.refunded_minor, currency),
            net: money(totals.net_minor(), currency),
        }
    }
}

fn money(minor: i64, currency: Currency) -> serde_json::Number {
    crate::domain::money::sum_to_json_number(minor, currency)
}

/// The sales report.
#[derive(Serialize, ToSchema)]
#[schema(as = SalesReport)]
struct SalesReportView {
    /// `day` or `hour`.
    #[schema(schema_with = granularity)]
    granularity: &'static str,
    /// The first period's start: `from` rounded down to a whole period.
    from: DateTime<Utc>,
    /// The last period's end: `to` rounded up to a whole period.
    to: DateTime<Utc>,
    /// The store currency every amount is in (orders in another currency are not counted).
    currency: Currency,
    /// Every period from `from` to `to`, oldest first; zeros where nothing sold.
    data: Vec<PeriodView>,
    /// The whole range.
    totals: TotalsView,
}

/// The sums over every period of the report.
#[derive(Serialize, ToSchema)]
#[schema(as = SalesTotals)]
struct TotalsView {
    orders: i64,
    units: i64,
    #[schema(schema_with = schema::money_ref)]
    gross: serde_json::Number,
    #[schema(schema_with = schema::money_ref)]
    refunded: serde_json::Number,
    #[schema(schema_with = schema::money_ref)]
    net: serde_json::Number,
}

fn granularity() -> ObjectBuilder {
    ObjectBuilder::new()
        .schema_type(Type::String)
        .enum_values(Some(Granularity::ALL.map(Granularity::as_str)))
}

fn instant(description: &str) -> ObjectBuilder {
    ObjectBuilder::new()
        .schema_type(Type::String)
        .description(Some(description))
        .format(Some(SchemaFormat::KnownFormat(KnownFormat::DateTime)))
}

/// The query of GET /admin/reports/sales.
struct SalesParams;

impl IntoParams for SalesParams {
    fn into_params(_: impl Fn() -> Option<ParameterIn>) -> Vec<Parameter> {
        vec![
            parameter(
                "from",
                ParameterIn::Query,
                false,
                &format!(
                    "Start of the range: an RFC 3339 time or a date (`2026-12-01`, midnight UTC), rounded down to \
                     a whole period. Default: {DEFAULT_DAYS} days (or {DEFAULT_HOURS} hours) before `to`."
                ),
                instant("RFC 3339 time or YYYY-MM-DD.").format(None),
            ),
            parameter(
                "to",
                ParameterIn::Query,
                false,
                "End of the range (exclusive), rounded up to a whole period. Default: now.",
                instant("RFC 3339 time or YYYY-MM-DD.").format(None),
            ),
            parameter(
                "granularity",
                ParameterIn::Query,
                false,
                &format!("The length of each period; at most {MAX_PERIODS} periods per report."),
                granularity().default(Some("day".into())),
            ),
        ]
    }
}

/// Sales per day or hour
///
/// Admin only. Per period (UTC): orders accepted whose payment was taken, their units, gross,
/// refunded and net amounts (docs/api.md "Sales report"). Read from the replica when the server
/// has `--read-database-url` and the replica is up and caught up.
#[utoipa::path(
    get,
    path = "/admin/reports/sales",
    operation_id = "salesReport",
    tag = "admin",
    security(("bearer" = [])),
    params(SalesParams),
    responses(
        (status = 200, description = "The report.", body = SalesReportView, headers(
            ("Cache-Control" = String, description = "`private, no-store`."),
        )),
        (status = 403, description = "Not an admin.", body = Problem, content_type = "application/problem+json"),
    ),
)]
async fn sales(State(state): State<AppState>, Admin(_): Admin, RawQuery(raw): RawQuery) -> Result<Response, ApiError> {
    let params = QueryParams::of::<SalesParams>(raw.as_deref())?;
    // An empty bound (`?from=`) is the bound left out: its default.
    let bound = |name: &str| params.get(name).filter(|value| !value.is_empty());
    let range = SalesRange::parse(bound("from"), bound("to"), params.get("granularity"), clock::now())
        .map_err(ApiError::validation)?;
    let currency = state.checkout.currency;
    let periods = state.store.sales_report(&range, currency).await?;
    let mut sum = SalesTotals::default();
    for period in &periods {
        sum.orders += period.totals.orders;
        sum.units += period.totals.units;
        sum.gross_minor += period.totals.gross_minor;
        sum.refunded_minor += period.totals.refunded_minor;
    }
    Ok(private(Json(SalesReportView {
        granularity: range.granularity.as_str(),
        from: range.start,
        to: range.end,
        currency,
        data: periods
            .iter()
            .map(|period| PeriodView::new(period.start, range.granularity, &period.totals, currency))
            .collect(),
        totals: TotalsView {
            orders: sum.orders,
            units: sum.units,
            gross: money(sum.gross_minor, currency),
            refunded: money(sum.refunded_minor, currency),
            net: money(sum.net_minor(), currency),
        },
    })))
}
