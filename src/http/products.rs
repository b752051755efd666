//! Catalog routes: public reads (cacheable, with ETags) and admin writes.

use axum::Router;
use axum::extract::{Path, RawQuery, State};
use axum::http::{HeaderMap, HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use chrono::{DateTime, Utc};
use serde::{Deserialize, Deserializer, Serialize};
use sha2::{Digest, Sha256};

use super::AppState;
use super::auth::Admin;
use super::error::ApiError;
use super::extract::{ApiJson, QueryParams, path_id};
use crate::domain::product::{self, NewProduct, ProductPatch, StockAdjustment};
use crate::domain::{Currency, FieldErrors, Money, Product, ProductId};
use crate::store::{AdjustOutcome, ProductQuery};

pub fn routes() -> Router<AppState> {
    Router::new()
        .route("/products", get(list).post(create))
        .route("/products/{id}", get(show).patch(update))
        .route("/products/{id}/stock", post(adjust_stock))
}

/// How a product is shown to clients. `stock_quantity` is what can still be ordered.
#[derive(Serialize)]
pub struct ProductView {
    product_id: ProductId,
    sku: Option<String>,
    name: String,
    description: Option<String>,
    category: Option<String>,
    price: serde_json::Number,
    currency: Currency,
    stock_quantity: i64,
    created_at: DateTime<Utc>,
    updated_at: DateTime<Utc>,
}

impl ProductView {
    pub fn new(product: Product, currency: Currency) -> Self {
        Self {
            product_id: product.id,
            stock_quantity: product.available(),
            price: product.price.to_json_number(currency),
            currency,
            sku: product.sku,
            name: product.name,
            description: product.description,
            category: product.category,
            created_at: product.created_at,
            updated_at: product.updated_at,
        }
    }
}

#[derive(Serialize)]
struct ProductList {
    data: Vec<ProductView>,
    next_cursor: Option<String>,
}

async fn list(
    State(state): State<AppState>,
    RawQuery(raw): RawQuery,
    headers: HeaderMap,
) -> Result<Response, ApiError> {
    let params = QueryParams::parse(raw.as_deref(), &["category", "limit", "cursor"])?;
    let category = params
        .get("category")
        .map(|c| product::parse_category(c).map_err(|message| ApiError::invalid_field("query.category", message)))
        .transpose()?;
    let query = ProductQuery {
        category,
        after: params.cursor()?,
        limit: params.limit()?,
    };
    let page = state.store.list_products(&query).await?;
    let currency = state.checkout.currency;
    let body = ProductList {
        data: page.items.into_iter().map(|p| ProductView::new(p, currency)).collect(),
        next_cursor: page.next_after.map(|id| id.simple().to_string()),
    };
    Ok(cacheable(&headers, &body))
}

async fn show(State(state): State<AppState>, Path(id): Path<String>, headers: HeaderMap) -> Result<Response, ApiError> {
    let id: ProductId = path_id("id", &id)?;
    let product = state
        .store
        .get_product(id)
        .await?
        .ok_or_else(|| ApiError::not_found("product"))?;
    Ok(cacheable(&headers, &ProductView::new(product, state.checkout.currency)))
}

/// A public JSON response with a strong ETag; a matching `If-None-Match` gets 304.
fn cacheable(request_headers: &HeaderMap, body: &impl Serialize) -> Response {
    let bytes = serde_json::to_vec(body).expect("views always serialize");
    let digest = Sha256::digest(&bytes);
    let etag = format!(
        "\"{}\"",
        digest[..16].iter().map(|b| format!("{b:02x}")).collect::<String>()
    );
    let matches = request_headers
        .get_all(header::IF_NONE_MATCH)
        .iter()
        .filter_map(|value| value.to_str().ok())
        .flat_map(|value| value.split(','))
        .map(|tag| tag.trim().trim_start_matches("W/"))
        .any(|tag| tag == etag || tag == "*");
    let mut response = if matches {
        StatusCode::NOT_MODIFIED.into_response()
    } else {
        ([(header::CONTENT_TYPE, "application/json")], bytes).into_response()
    };
    let headers = response.headers_mut();
    headers.insert(
        header::ETAG,
        HeaderValue::from_str(&etag).expect("hex is a valid header"),
    );
    headers.insert(
        header::CACHE_CONTROL,
        HeaderValue::from_static("public, max-age=5, stale-while-revalidate=30"),
    );
    response
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct CreateProduct {
    name: Option<String>,
    description: Option<String>,
    price: Option<serde_json::Number>,
    stock_quantity: Option<i64>,
    category: Option<String>,
    sku: Option<String>,
}

fn parse_price(number: &serde_json::Number, currency: Currency) -> Result<Money, String> {
    Money::parse_decimal(&number.to_string(), currency)
}

fn required<T>(errors: &mut FieldErrors, field: &str, value: Option<T>) -> Option<T> {
    if value.is_none() {
        errors.add(field, "is required");
    }
    value
}

async fn create(
    State(state): State<AppState>,
    Admin(_): Admin,
    ApiJson(body): ApiJson<CreateProduct>,
) -> Result<Response, ApiError> {
    let currency = state.checkout.currency;
    let mut errors = FieldErrors::new();
    let name = required(&mut errors, "/name", body.name).and_then(|n| errors.check("/name", product::parse_name(&n)));
    let price =
        required(&mut errors, "/price", body.price).and_then(|p| errors.check("/price", parse_price(&p, currency)));
    let stock = required(&mut errors, "/stock_quantity", body.stock_quantity)
        .and_then(|s| errors.check("/stock_quantity", product::parse_stock(s)));
    let description = body
        .description
        .and_then(|d| errors.check("/description", product::parse_description(&d)));
    let category = body
        .category
        .and_then(|c| errors.check("/category", product::parse_category(&c)));
    let sku = body.sku.and_then(|s| errors.check("/sku", product::parse_sku(&s)));
    if !errors.is_empty() {
        return Err(ApiError::validation(errors));
    }
    let (Some(name), Some(price), Some(stock)) = (name, price, stock) else {
        unreachable!("every missing field was recorded as an error")
    };
    let new = NewProduct {
        id: ProductId::new(),
        sku,
        name,
        description,
        category,
        price,
        stock,
    };
    let product = state.store.create_product(&new, crate::clock::now()).await?;
    let location = format!("/products/{}", product.id);
    Ok((
        StatusCode::CREATED,
        [(header::LOCATION, location)],
        axum::Json(ProductView::new(product, currency)),
    )
        .into_response())
}

/// `Some(None)` for an explicit `null`, `None` for an absent field.
fn nullable<'de, D: Deserializer<'de>, T: Deserialize<'de>>(deserializer: D) -> Result<Option<Option<T>>, D::Error> {
    Option::<T>::deserialize(deserializer).map(Some)
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct UpdateProduct {
    name: Option<String>,
    #[serde(default, deserialize_with = "nullable")]
    description: Option<Option<String>>,
    #[serde(default, deserialize_with = "nullable")]
    category: Option<Option<String>>,
    price: Option<serde_json::Number>,
}

async fn update(
    State(state): State<AppState>,
    Admin(_): Admin,
    Path(id): Path<String>,
    ApiJson(body): ApiJson<UpdateProduct>,
) -> Result<Response, ApiError> {
    let id: ProductId = path_id("id", &id)?;
    let currency = state.checkout.currency;
    let mut errors = FieldErrors::new();
    let patch = ProductPatch {
        name: body.name.and_then(|n| errors.check("/name", product::parse_name(&n))),
        description: body
            .description
            .map(|d| d.and_then(|d| errors.check("/description", product::parse_description(&d)))),
        category: body
            .category
            .map(|c| c.and_then(|c| errors.check("/category", product::parse_category(&c)))),
        price: body
            .price
            .and_then(|p| errors.check("/price", parse_price(&p, currency))),
    };
    if !errors.is_empty() {
        return Err(ApiError::validation(errors));
    }
    if patch.is_empty() {
        return Err(ApiError::invalid_field(
            "/",
            "name at least one of: name, description, category, price",
        ));
    }
    let product = state
        .store
        .update_product(id, &patch, crate::clock::now())
        .await?
        .ok_or_else(|| ApiError::not_found("product"))?;
    Ok(axum::Json(ProductView::new(product, currency)).into_response())
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct AdjustStock {
    delta: Option<i64>,
    reason: Option<String>,
}

async fn adjust_stock(
    State(state): State<AppState>,
    Admin(_): Admin,
    Path(id): Path<String>,
    ApiJson(body): ApiJson<AdjustStock>,
) -> Result<Response, ApiError> {
    let id: ProductId = path_id("id", &id)?;
    let mut errors = FieldErrors::new();
    let delta =
        required(&mut errors, "/delta", body.delta).and_then(|d| errors.check("/delta", product::parse_delta(d)));
    let reason =
        required(&mut errors, "/reason", body.reason).and_then(|r| errors.check("/reason", product::parse_reason(&r)));
    let (Some(delta), Some(reason)) = (delta, reason) else {
        return Err(ApiError::validation(errors));
    };
    match state
        .store
        .adjust_stock(id, &StockAdjustment { delta, reason }, crate::clock::now())
        .await?
    {
        AdjustOutcome::Adjusted(product) => {
            Ok(axum::Json(ProductView::new(product, state.checkout.currency)).into_response())
        }
        AdjustOutcome::NotFound => Err(ApiError::not_found("product")),
        AdjustOutcome::WouldBreakReservations { on_hand, reserved } => Err(ApiError::conflict(
            "stock_below_reserved",
            format!(
                "on-hand stock is {on_hand} with {reserved} reserved for open orders; it cannot go below {reserved}"
            ),
        )
        .with_field("/delta", format!("must be at least {}", reserved - on_hand))),
    }
}
