//! Customer routes. A customer principal may create and read only its own record (its token's
//! `sub` is its customer id); others asking get 404, so existence is not revealed.

use axum::Json;
use axum::extract::{Path, RawQuery, State};
use axum::http::{StatusCode, header};
use axum::response::Response;
use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};
use utoipa::ToSchema;
use utoipa_axum::router::OpenApiRouter;
use utoipa_axum::routes;

use super::auth::Principal;
use super::error::{ApiError, Problem};
use super::extract::{ApiJson, PageParams, QueryParams, path_id};
use super::orders::OrderView;
use super::{AppState, private, schema};
use crate::domain::customer::parse_person_name;
use crate::domain::{Customer, CustomerId, Email, FieldErrors, NewCustomer, OrderId};

pub fn routes() -> OpenApiRouter<AppState> {
    OpenApiRouter::default()
        .routes(routes!(create))
        .routes(routes!(show))
        .routes(routes!(orders))
}

/// A customer record.
#[derive(Serialize, ToSchema)]
#[schema(as = Customer)]
struct CustomerView {
    customer_id: CustomerId,
    email: Email,
    first_name: String,
    last_name: String,
    created_at: DateTime<Utc>,
}

impl From<Customer> for CustomerView {
    fn from(customer: Customer) -> Self {
        Self {
            customer_id: customer.id,
            email: customer.email,
            first_name: customer.first_name,
            last_name: customer.last_name,
            created_at: customer.created_at,
        }
    }
}

/// A new customer. The e-mail address is lower-cased and must be unique.
#[derive(Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
struct CreateCustomer {
    /// An admin may choose the id (else a new one is made); a customer may only give its own
    /// token's `sub`, which is also the default.
    #[schema(schema_with = schema::optional_customer_id)]
    customer_id: Option<String>,
    #[schema(schema_with = schema::email, required = true)]
    email: Option<String>,
    #[schema(schema_with = schema::person_name, required = true)]
    first_name: Option<String>,
    #[schema(schema_with = schema::person_name, required = true)]
    last_name: Option<String>,
}

/// Create a customer
///
/// An admin, or a customer creating the record for its own token's `sub`.
#[utoipa::path(
    post,
    path = "/customers",
    operation_id = "createCustomer",
    tag = "customers",
    security(("bearer" = [])),
    request_body = CreateCustomer,
    responses(
        (status = 201, description = "Created.", body = CustomerView, headers(
            ("Location" = String, description = "`/customers/{id}` of the new customer."),
            ("Cache-Control" = String, description = "`private, no-store`."),
        )),
        (status = 403, description = "A customer creating someone else's record, or a token whose subject is not a customer id.", body = Problem, content_type = "application/problem+json"),
        (status = 409, description = "`already_exists`: the e-mail address or id is taken.", body = Problem, content_type = "application/problem+json"),
    ),
)]
async fn create(
    State(state): State<AppState>,
    principal: Principal,
    ApiJson(body): ApiJson<CreateCustomer>,
) -> Result<Response, ApiError> {
    let mut errors = FieldErrors::new();
    let requested_id = body.customer_id.and_then(|id| {
        errors.check(
            "/customer_id",
            id.parse::<CustomerId>().map_err(|_| "must be a UUID".to_string()),
        )
    });
    let mut text = |field: &str, value: Option<String>, parse: &dyn Fn(&str) -> Result<String, String>| match value {
        None => {
            errors.add(field, "is required");
            None
        }
        Some(value) => errors.check(field, parse(&value)),
    };
    let first_name = text("/first_name", body.first_name, &parse_person_name);
    let last_name = text("/last_name", body.last_name, &parse_person_name);
    let email = match body.email {
        None => {
            errors.add("/email", "is required");
            None
        }
        Some(email) => errors.check("/email", Email::parse(&email)),
    };
    let (Some(email), Some(first_name), Some(last_name)) = (email, first_name, last_name) else {
        return Err(ApiError::validation(errors));
    };
    if !errors.is_empty() {
        return Err(ApiError::validation(errors));
    }
    let id = if principal.is_admin() {
        requested_id.unwrap_or_default()
    } else {
        let own = principal.customer_id().ok_or_else(|| {
            ApiError::forbidden("this token's subject is not a customer id (UUID), so it cannot own a customer record")
        })?;
        if requested_id.is_some_and(|requested| requested != own) {
            return Err(ApiError::forbidden("customers may only create their own record")
                .with_field("/customer_id", "must be your own id"));
        }
        own
    };
    let customer = state
        .store
        .create_customer(
            &NewCustomer {
                id,
                email,
                first_name,
                last_name,
            },
            crate::clock::now(),
        )
        .await?;
    let location = format!("/customers/{}", customer.id);
    Ok(private((
        StatusCode::CREATED,
        [(header::LOCATION, location)],
        Json(CustomerView::from(customer)),
    )))
}

/// Get a customer
///
/// The owner or an admin; anyone else gets 404.
#[utoipa::path(
    get,
    path = "/customers/{id}",
    operation_id = "getCustomer",
    tag = "customers",
    security(("bearer" = [])),
    params(("id" = Uuid, Path, description = "The customer's id.")),
    responses(
        (status = 200, description = "The customer.", body = CustomerView, headers(
            ("Cache-Control" = String, description = "`private, no-store`."),
        )),
        (status = 404, description = "No such customer (or not you).", body = Problem, content_type = "application/problem+json"),
    ),
)]
async fn show(
    State(state): State<AppState>,
    principal: Principal,
    Path(id): Path<String>,
) -> Result<Response, ApiError> {
    let id: CustomerId = path_id("id", &id)?;
    if !principal.may_access(id) {
        return Err(ApiError::not_found("customer"));
    }
    let customer = state
        .store
        .get_customer(id)
        .await?
        .ok_or_else(|| ApiError::not_found("customer"))?;
    Ok(private(Json(CustomerView::from(customer))))
}

/// A page of orders, newest first.
#[derive(Serialize, ToSchema)]
pub(super) struct OrderList {
    pub(super) data: Vec<OrderView>,
    /// Pass as `cursor` to get the next page; `null` on the last page.
    pub(super) next_cursor: Option<String>,
}

/// List a customer's orders
///
/// The owner or an admin, newest first.
#[utoipa::path(
    get,
    path = "/customers/{id}/orders",
    operation_id = "listCustomerOrders",
    tag = "customers",
    security(("bearer" = [])),
    params(("id" = Uuid, Path, description = "The customer's id."), PageParams),
    responses(
        (status = 200, description = "A page of the customer's orders.", body = OrderList, headers(
            ("Cache-Control" = String, description = "`private, no-store`."),
        )),
        (status = 404, description = "No such customer (or not you).", body = Problem, content_type = "application/problem+json"),
    ),
)]
async fn orders(
    State(state): State<AppState>,
    principal: Principal,
    Path(id): Path<String>,
    RawQuery(raw): RawQuery,
) -> Result<Response, ApiError> {
    let id: CustomerId = path_id("id", &id)?;
    let params = QueryParams::of::<PageParams>(raw.as_deref())?;
    if !principal.may_access(id) {
        return Err(ApiError::not_found("customer"));
    }
    if state.store.get_customer(id).await?.is_none() {
        return Err(ApiError::not_found("customer"));
    }
    let before: Option<OrderId> = params.cursor()?;
    let page = state.store.list_customer_orders(id, before, params.limit()?).await?;
    Ok(private(Json(OrderList {
        data: page
            .items
            .into_iter()
            .map(|order| OrderView::new(order, None))
            .collect(),
        next_cursor: page.next_after.map(|id| id.simple().to_string()),
    })))
}
