//! Catalog routes: public reads (cacheable, with ETags) and admin writes.

use axum::extract::{Path, RawQuery, State};
use axum::http::{HeaderMap, HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use chrono::{DateTime, Utc};
use serde::{Deserialize, Deserializer, Serialize};
use sha2::{Digest, Sha256};
use utoipa::openapi::path::{Parameter, ParameterIn};
use utoipa::openapi::schema::{ObjectBuilder, Type};
use utoipa::{IntoParams, ToSchema};
use utoipa_axum::router::OpenApiRouter;
use utoipa_axum::routes;

use super::AppState;
use super::auth::Admin;
use super::error::{ApiError, Problem};
use super::extract::{
    ApiJson, QueryParams, cursor_parameter, limit_parameter, optional_whole_number, parameter, path_id,
};
use super::schema;
use crate::domain::product::{self, NewProduct, ProductPatch, StockAdjustment};
use crate::domain::{Currency, FieldErrors, Money, Product, ProductId};
use crate::store::{AdjustOutcome, ProductQuery};

pub fn routes() -> OpenApiRouter<AppState> {
    OpenApiRouter::default()
        .routes(routes!(list, create))
        .routes(routes!(show, update))
        .routes(routes!(adjust_stock))
}

/// How a product is shown to clients.
#[derive(Serialize, ToSchema)]
#[schema(as = Product)]
pub struct ProductView {
    product_id: ProductId,
    /// Stock-keeping unit, unique across the catalog.
    sku: Option<String>,
    name: String,
    description: Option<String>,
    category: Option<String>,
    /// Unit price in the store currency.
    #[schema(schema_with = schema::money_ref)]
    price: serde_json::Number,
    currency: Currency,
    /// Units that can still be ordered: on hand minus reserved for open orders.
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

/// A page of products, in creation order.
#[derive(Serialize, ToSchema)]
struct ProductList {
    data: Vec<ProductView>,
    /// Pass as `cursor` to get the next page; `null` on the last page.
    next_cursor: Option<String>,
}

/// The query of GET /products.
struct ProductListParams;

impl IntoParams for ProductListParams {
    fn into_params(_: impl Fn() -> Option<ParameterIn>) -> Vec<Parameter> {
        vec![
            parameter(
                "category",
                ParameterIn::Query,
                false,
                "Only products in this category (exact match).",
                schema::category(),
            ),
            limit_parameter(),
            cursor_parameter(),
        ]
    }
}

/// `If-None-Match` on catalog reads.
struct ConditionalRead;

impl IntoParams for ConditionalRead {
    fn into_params(_: impl Fn() -> Option<ParameterIn>) -> Vec<Parameter> {
        vec![parameter(
            "If-None-Match",
            ParameterIn::Header,
            false,
            "ETags of copies the client holds; when one matches (or `*`), the answer is 304 without a body.",
            ObjectBuilder::new().schema_type(Type::String),
        )]
    }
}

/// List products
///
/// The public catalog, one page at a time. Cacheable: a strong `ETag` and a public
/// `Cache-Control`; a matching `If-None-Match` gets 304.
#[utoipa::path(
    get,
    path = "/products",
    operation_id = "listProducts",
    tag = "catalog",
    params(ProductListParams, ConditionalRead),
    responses(
        (status = 200, description = "A page of products.", body = ProductList, headers(
            ("ETag" = String, description = "Strong validator of this representation."),
            ("Cache-Control" = String, description = "Public and short-lived, e.g. `public, max-age=5, stale-while-revalidate=30`."),
        )),
        (status = 304, description = "Not modified: the client's copy (If-None-Match) is current.", headers(
            ("ETag" = String, description = "The current validator."),
            ("Cache-Control" = String),
        )),
    ),
)]
async fn list(
    State(state): State<AppState>,
    RawQuery(raw): RawQuery,
    headers: HeaderMap,
) -> Result<Response, ApiError> {
    let params = QueryParams::of::<ProductListParams>(raw.as_deref())?;
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
    Ok(cacheable(&state, &headers, &body))
}

/// Get a product
///
/// One product with the stock that can still be ordered. Cacheable like the list.
#[utoipa::path(
    get,
    path = "/products/{id}",
    operation_id = "getProduct",
    tag = "catalog",
    params(("id" = Uuid, Path, description = "The product's id."), ConditionalRead),
    responses(
        (status = 200, description = "The product.", body = ProductView, headers(
            ("ETag" = String, description = "Strong validator of this representation."),
            ("Cache-Control" = String, description = "Public and short-lived."),
        )),
        (status = 304, description = "Not modified: the client's copy (If-None-Match) is current.", headers(
            ("ETag" = String), ("Cache-Control" = String),
        )),
        (status = 404, description = "No such product.", body = Problem, content_type = "application/problem+json"),
    ),
)]
async fn show(State(state): State<AppState>, Path(id): Path<String>, headers: HeaderMap) -> Result<Response, ApiError> {
    let id: ProductId = path_id("id", &id)?;
    let product = state
        .store
        .get_product(id)
        .await?
        .ok_or_else(|| ApiError::not_found("product"))?;
    Ok(cacheable(
        &state,
        &headers,
        &ProductView::new(product, state.checkout.currency),
    ))
}

/// A public JSON response with a strong ETag and the configured `Cache-Control`; a matching
/// `If-None-Match` gets 304.
fn cacheable(state: &AppState, request_headers: &HeaderMap, body: &impl Serialize) -> Response {
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
    if let Ok(value) = HeaderValue::from_str(&state.edge.settings.catalog_cache_control) {
        headers.insert(header::CACHE_CONTROL, value);
    }
    response
}

/// A new catalog product. Prices are exact decimals in the store currency.
#[derive(Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
struct CreateProduct {
    #[schema(schema_with = schema::product_name, required = true)]
    name: Option<String>,
    #[schema(schema_with = schema::optional_product_description)]
    description: Option<String>,
    #[schema(schema_with = schema::money_ref, required = true)]
    price: Option<serde_json::Number>,
    #[serde(default, deserialize_with = "optional_whole_number")]
    #[schema(schema_with = schema::initial_stock, required = true)]
    stock_quantity: Option<i64>,
    #[schema(schema_with = schema::optional_category)]
    category: Option<String>,
    #[schema(schema_with = schema::optional_sku)]
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

/// Create a product
///
/// Admin only. The initial stock is written to the inventory ledger.
#[utoipa::path(
    post,
    path = "/products",
    operation_id = "createProduct",
    tag = "catalog",
    security(("bearer" = [])),
    request_body = CreateProduct,
    responses(
        (status = 201, description = "Created.", body = ProductView, headers(
            ("Location" = String, description = "`/products/{id}` of the new product."),
        )),
        (status = 403, description = "Not an admin.", body = Problem, content_type = "application/problem+json"),
        (status = 409, description = "`already_exists`: the SKU is taken.", body = Problem, content_type = "application/problem+json"),
    ),
)]
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

/// Changes to a product: any of its fields, at least one. `null` clears `description` or
/// `category`; `name` and `price` cannot be cleared.
#[derive(Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
struct UpdateProduct {
    #[serde(default, deserialize_with = "nullable")]
    #[schema(schema_with = schema::product_name)]
    name: Option<Option<String>>,
    #[serde(default, deserialize_with = "nullable")]
    #[schema(schema_with = schema::optional_product_description)]
    description: Option<Option<String>>,
    #[serde(default, deserialize_with = "nullable")]
    #[schema(schema_with = schema::optional_category)]
    category: Option<Option<String>>,
    #[serde(default, deserialize_with = "nullable")]
    #[schema(schema_with = schema::money_ref)]
    price: Option<Option<serde_json::Number>>,
}

/// A field that may be left out but, when present, must not be `null`.
fn not_null<T>(errors: &mut FieldErrors, field: &str, value: Option<Option<T>>) -> Option<T> {
    match value {
        Some(None) => {
            errors.add(field, "must not be null; leave it out to keep the current value");
            None
        }
        Some(Some(value)) => Some(value),
        None => None,
    }
}

/// Update a product
///
/// Admin only. Changes name, description, category or price; stock changes go through
/// POST /products/{id}/stock.
#[utoipa::path(
    patch,
    path = "/products/{id}",
    operation_id = "updateProduct",
    tag = "catalog",
    security(("bearer" = [])),
    params(("id" = Uuid, Path, description = "The product's id.")),
    request_body = UpdateProduct,
    responses(
        (status = 200, description = "The updated product.", body = ProductView),
        (status = 403, description = "Not an admin.", body = Problem, content_type = "application/problem+json"),
        (status = 404, description = "No such product.", body = Problem, content_type = "application/problem+json"),
    ),
)]
async fn update(
    State(state): State<AppState>,
    Admin(_): Admin,
    Path(id): Path<String>,
    ApiJson(body): ApiJson<UpdateProduct>,
) -> Result<Response, ApiError> {
    let id: ProductId = path_id("id", &id)?;
    let currency = state.checkout.currency;
    let mut errors = FieldErrors::new();
    let name = not_null(&mut errors, "/name", body.name);
    let price = not_null(&mut errors, "/price", body.price);
    let patch = ProductPatch {
        name: name.and_then(|n| errors.check("/name", product::parse_name(&n))),
        description: body
            .description
            .map(|d| d.and_then(|d| errors.check("/description", product::parse_description(&d)))),
        category: body
            .category
            .map(|c| c.and_then(|c| errors.check("/category", product::parse_category(&c)))),
        price: price.and_then(|p| errors.check("/price", parse_price(&p, currency))),
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

/// A restock (positive `delta`) or correction (negative), with the reason for the ledger.
#[derive(Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
struct AdjustStock {
    #[serde(default, deserialize_with = "optional_whole_number")]
    #[schema(schema_with = schema::stock_delta, required = true)]
    delta: Option<i64>,
    #[schema(schema_with = schema::stock_reason, required = true)]
    reason: Option<String>,
}

/// Adjust stock
///
/// Admin only. Writes an inventory ledger row; on-hand stock never goes below what is reserved
/// for open orders.
#[utoipa::path(
    post,
    path = "/products/{id}/stock",
    operation_id = "adjustStock",
    tag = "catalog",
    security(("bearer" = [])),
    params(("id" = Uuid, Path, description = "The product's id.")),
    request_body = AdjustStock,
    responses(
        (status = 200, description = "The product with its new stock.", body = ProductView),
        (status = 403, description = "Not an admin.", body = Problem, content_type = "application/problem+json"),
        (status = 404, description = "No such product.", body = Problem, content_type = "application/problem+json"),
        (status = 409, description = "`stock_below_reserved`: on-hand stock would fall below what is reserved (or above the maximum).", body = Problem, content_type = "application/problem+json"),
    ),
)]
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
