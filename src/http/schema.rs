//! The API schema of every constrained value, built from the same constants the validators
//! enforce (`domain::*::…_MAX`, the `…_PATTERN`s, `extract`'s paging limits). A limit is
//! declared once, in the domain or the extractor that enforces it, and published from here: the
//! derive attributes of `utoipa` only take literals, so fields point at these functions with
//! `#[schema(schema_with = …)]`, and domain newtypes get hand-written `ToSchema` impls.

use utoipa::openapi::schema::{
    AnyOfBuilder, ArrayBuilder, KnownFormat, Object, ObjectBuilder, Schema, SchemaFormat, Type,
};
use utoipa::openapi::{Ref, RefOr};
use utoipa::{PartialSchema, ToSchema};

use crate::domain::customer::{EMAIL_LOCAL_MAX, EMAIL_MAX, PERSON_NAME_MAX};
use crate::domain::money::MAX_MINOR;
use crate::domain::order::{MAX_LINES, MAX_QUANTITY, PAYMENT_TOKEN_MAX, PAYMENT_TOKEN_PATTERN};
use crate::domain::product::{CATEGORY_MAX, DESCRIPTION_MAX, NAME_MAX, REASON_MAX, SKU_MAX, SKU_PATTERN, STOCK_MAX};
use crate::domain::shipping::{
    ADDRESS_LINE_MAX, CITY_MAX, COUNTRY_CODES, POSTAL_CODE_MAX, POSTAL_CODE_PATTERN, RECIPIENT_MAX, REGION_MAX,
};
use crate::domain::validation::{OPTIONAL_TEXT_PATTERN, SINGLE_LINE_PATTERN, TEXT_PATTERN};
use crate::domain::{
    CountryCode, Currency, CustomerId, Email, FieldError, OrderId, OrderStatus, ProductId, Quantity, ShippingAddress,
    Shortage,
};

/// Name of the money component, whose precision follows the configured currency.
pub const MONEY: &str = "Money";

fn string(description: &str) -> ObjectBuilder {
    ObjectBuilder::new()
        .schema_type(Type::String)
        .description(Some(description))
}

fn integer(description: &str, min: i64, max: i64) -> ObjectBuilder {
    ObjectBuilder::new()
        .schema_type(Type::Integer)
        .format(Some(SchemaFormat::KnownFormat(KnownFormat::Int64)))
        .minimum(Some(min))
        .maximum(Some(max))
        .description(Some(description))
}

/// Required text (`validation::text`): not blank, at most `max` characters as sent.
fn text(description: &str, max: usize) -> Object {
    string(description)
        .min_length(Some(1))
        .max_length(Some(max))
        .pattern(Some(TEXT_PATTERN))
        .build()
}

/// Optional text (`validation::optional_text`): may be empty.
fn optional_text(description: &str, max: usize) -> Object {
    string(description)
        .max_length(Some(max))
        .pattern(Some(OPTIONAL_TEXT_PATTERN))
        .build()
}

/// One line of required text (`validation::single_line`): like [`text`], no tab or line feed.
pub fn single_line(description: &str, max: usize) -> Object {
    string(description)
        .min_length(Some(1))
        .max_length(Some(max))
        .pattern(Some(SINGLE_LINE_PATTERN))
        .build()
}

pub fn product_name() -> Object {
    text("Product name; surrounding white space is trimmed.", NAME_MAX)
}

pub fn product_description() -> Object {
    optional_text("Free-text description; may be empty.", DESCRIPTION_MAX)
}

pub fn category() -> Object {
    text("Category the product is listed under.", CATEGORY_MAX)
}

pub fn sku() -> Object {
    string("Stock-keeping unit, unique across the catalog; no white space.")
        .min_length(Some(1))
        .max_length(Some(SKU_MAX))
        .pattern(Some(SKU_PATTERN))
        .build()
}

pub fn stock_reason() -> Object {
    text("Why stock changed; recorded in the inventory ledger.", REASON_MAX)
}

pub fn initial_stock() -> Object {
    integer("Units on hand to start with.", 0, STOCK_MAX).build()
}

/// A non-zero stock change: two ranges, since JSON Schema has no "not zero" for integers that
/// every generator understands.
pub fn stock_delta() -> Schema {
    let range = |min, max| integer("", min, max).description(None::<String>).build();
    Schema::AnyOf(
        AnyOfBuilder::new()
            .item(range(-STOCK_MAX, -1))
            .item(range(1, STOCK_MAX))
            .description(Some(
                "Units to add (restock) or remove (correction); never zero. On-hand stock may not go below what \
                 is reserved for open orders.",
            ))
            .build(),
    )
}

pub fn person_name() -> Object {
    text(
        "Given or family name; surrounding white space is trimmed.",
        PERSON_NAME_MAX,
    )
}

pub fn email() -> Object {
    string(&format!(
        "E-mail address; stored lower-cased, unique across customers. A local part of at most {EMAIL_LOCAL_MAX} \
         characters, and a domain of letters, digits and hyphens with at least one dot."
    ))
    .format(Some(SchemaFormat::KnownFormat(KnownFormat::Email)))
    .max_length(Some(EMAIL_MAX))
    .build()
}

pub fn payment_token() -> Object {
    string(
        "Payment-method token from the provider (sandbox: tok_visa, tok_chargeDeclined, tok_timeout, tok_flaky, \
         tok_unavailable). Printable ASCII, no spaces; never card data.",
    )
    .min_length(Some(1))
    .max_length(Some(PAYMENT_TOKEN_MAX))
    .pattern(Some(PAYMENT_TOKEN_PATTERN))
    .examples(["tok_visa"])
    .build()
}

pub fn payment_method() -> Object {
    string("A Stripe PaymentMethod id (`pm_…`), e.g. from Stripe.js or Stripe's test `pm_card_visa`.")
        .min_length(Some(4))
        .max_length(Some(PAYMENT_TOKEN_MAX))
        .pattern(Some("^pm_[A-Za-z0-9_]+$"))
        .examples(["pm_card_visa"])
        .build()
}

pub fn uuid(description: &str) -> Object {
    string(description)
        .format(Some(SchemaFormat::KnownFormat(KnownFormat::Uuid)))
        .build()
}

pub fn customer_id_field() -> Object {
    uuid("Whose order or record this is. Customers may only name themselves (and may leave it out).")
}

pub fn product_id_field() -> Object {
    uuid("A product id from the catalog.")
}

/// The lines of an order: 1 to `MAX_LINES`, each product at most once.
pub fn order_items(item: RefOr<Schema>) -> ArrayBuilder {
    ArrayBuilder::new()
        .items(item)
        .min_items(Some(1))
        .max_items(Some(MAX_LINES))
}

/// A reference to the money component (see [`money`]).
pub fn money_ref() -> Ref {
    Ref::from_schema_name(MONEY)
}

/// Exact money in `currency`: a JSON number with at most its minor digits, parsed from its text.
pub fn money(currency: Currency) -> Schema {
    let digits = u32::from(currency.minor_digits());
    let step = 10_f64.powi(-(digits as i32));
    let max_major = MAX_MINOR / 10_i64.pow(digits);
    let mut builder = ObjectBuilder::new()
        .schema_type(Type::Number)
        .minimum(Some(0))
        .maximum(Some(max_major))
        .description(Some(format!(
            "An exact amount of {code}: a JSON number with at most {digits} decimal places (e.g. 199.99), parsed \
             from its text, never through binary floating point; no exponent, no sign. Answers always carry \
             exactly {digits} decimal places.",
            code = currency.code()
        )))
        .examples([serde_json::Value::Number(
            crate::domain::Money::from_minor(19_999)
                .unwrap_or_default()
                .to_json_number(currency),
        )]);
    if digits > 0 {
        builder = builder.multiple_of(Some(step));
    } else {
        builder = builder.schema_type(Type::Integer);
    }
    Schema::Object(builder.build())
}

macro_rules! leaf_schema {
    ($type:ty, $schema:expr) => {
        impl PartialSchema for $type {
            fn schema() -> RefOr<Schema> {
                RefOr::T(Schema::from($schema))
            }
        }
        impl ToSchema for $type {}
    };
}

leaf_schema!(ProductId, uuid("Product id (UUID v7)."));
leaf_schema!(
    CustomerId,
    uuid("Customer id (UUID v7); a customer's tokens carry it as `sub`.")
);
leaf_schema!(OrderId, uuid("Order id (UUID v7)."));
leaf_schema!(Email, email());
leaf_schema!(
    Currency,
    string("ISO 4217 code of the store currency.")
        .pattern(Some("^[A-Z]{3}$"))
        .examples(["USD"])
        .build()
);
leaf_schema!(Quantity, integer("Units of the product.", 1, i64::from(MAX_QUANTITY)));
leaf_schema!(
    OrderStatus,
    string(
        "Where the order is: pending_payment → paid → fulfilled (with external fulfilment, once every unit has \
         shipped) → refunded (refunded in full after delivery); pending_payment or paid → cancelled (declined, \
         expired, cancelled; a paid order's money goes back)."
    )
    .enum_values(Some(OrderStatus::ALL.map(OrderStatus::as_str)))
    .build()
);
leaf_schema!(
    FieldError,
    ObjectBuilder::new()
        .property(
            "field",
            string(
                "The bad field: a JSON pointer into the body (`/items/2/quantity`), `path.<name>`, `query.<name>`, or \
                 a header name."
            )
        )
        .required("field")
        .property("message", string("What is wrong with it."))
        .required("message")
        .build()
);
leaf_schema!(
    Shortage,
    ObjectBuilder::new()
        .description(Some("An order line the catalog cannot fill."))
        .property("product_id", ProductId::schema())
        .required("product_id")
        .property("requested", integer("Units asked for.", 1, i64::from(MAX_QUANTITY)))
        .required("requested")
        .property("available", integer("Units that can still be ordered.", 0, STOCK_MAX))
        .required("available")
        .build()
);

pub fn shipping_name() -> Object {
    single_line(
        "Who receives the parcel; one line, surrounding white space trimmed.",
        RECIPIENT_MAX,
    )
}

pub fn address_line1() -> Object {
    single_line(
        "Street address: street and number, PO box or company.",
        ADDRESS_LINE_MAX,
    )
}

pub fn address_line2() -> Object {
    or_null(single_line(
        "Apartment, suite, unit, building or floor; leave it out (or `null`) when there is none.",
        ADDRESS_LINE_MAX,
    ))
}

pub fn city() -> Object {
    single_line("City, town or village.", CITY_MAX)
}

pub fn region() -> Object {
    or_null(single_line(
        "State, province, county or prefecture, where the country uses one (e.g. `CA`, `Ontario`).",
        REGION_MAX,
    ))
}

pub fn postal_code() -> Object {
    string("Postal or ZIP code: letters, digits, spaces and hyphens; surrounding spaces trimmed.")
        .min_length(Some(1))
        .max_length(Some(POSTAL_CODE_MAX))
        .pattern(Some(POSTAL_CODE_PATTERN))
        .examples(["94103", "SW1A 1AA"])
        .build()
}

leaf_schema!(
    CountryCode,
    string("ISO 3166-1 alpha-2 country code, upper case: one of the assigned codes.")
        .enum_values(Some(COUNTRY_CODES))
        .examples(["US"])
        .build()
);

/// The address as orders show it: every member present, `line2` and `region` `null` when not
/// given.
impl PartialSchema for ShippingAddress {
    fn schema() -> RefOr<Schema> {
        let mut builder = ObjectBuilder::new().description(Some("Where the order ships, as given at checkout."));
        let properties: [(&str, Object); 6] = [
            ("name", shipping_name()),
            ("line1", address_line1()),
            ("line2", address_line2()),
            ("city", city()),
            ("region", region()),
            ("postal_code", postal_code()),
        ];
        for (name, schema) in properties {
            builder = builder.property(name, schema).required(name);
        }
        builder = builder
            .property("country", Ref::from_schema_name(CountryCode::name()))
            .required("country");
        RefOr::T(Schema::Object(builder.build()))
    }
}

impl ToSchema for ShippingAddress {
    fn schemas(schemas: &mut Vec<(String, RefOr<Schema>)>) {
        schemas.push((CountryCode::name().into_owned(), CountryCode::schema()));
    }
}

/// `schema` that also admits `null`, for optional body fields where `null` means "not given".
pub fn or_null(mut schema: Object) -> Object {
    use utoipa::openapi::schema::SchemaType;
    schema.schema_type = match schema.schema_type {
        SchemaType::Type(kind) => SchemaType::Array(vec![kind, Type::Null]),
        SchemaType::Array(mut kinds) => {
            kinds.push(Type::Null);
            SchemaType::Array(kinds)
        }
        any => any,
    };
    schema
}

pub fn optional_product_description() -> Object {
    or_null(product_description())
}

pub fn optional_category() -> Object {
    or_null(category())
}

pub fn optional_sku() -> Object {
    or_null(sku())
}

pub fn optional_customer_id() -> Object {
    or_null(customer_id_field())
}
