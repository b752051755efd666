//! The small sample catalog loaded into an empty database on first start (and by `orderflow
//! seed`), so a newcomer can place an order within a minute.

use crate::domain::{Currency, Money, NewProduct, ProductId};
use crate::store::{Store, StoreError};

/// (sku, name, category, price, stock, description)
const SAMPLE: &[(&str, &str, &str, &str, i64, &str)] = &[
    (
        "KB-001",
        "Mechanical keyboard",
        "peripherals",
        "129.00",
        40,
        "Tenkeyless, hot-swappable switches.",
    ),
    (
        "MS-001",
        "Wireless mouse",
        "peripherals",
        "49.99",
        120,
        "Rechargeable, 6 buttons.",
    ),
    (
        "MN-027",
        "27-inch monitor",
        "displays",
        "329.50",
        15,
        "2560×1440, 144 Hz.",
    ),
    (
        "HP-001",
        "Noise-cancelling headphones",
        "audio",
        "199.99",
        25,
        "Over-ear, 30 h battery.",
    ),
    (
        "CB-USB",
        "USB-C cable (2 m)",
        "accessories",
        "12.00",
        500,
        "100 W, braided.",
    ),
    (
        "ST-001",
        "Laptop stand",
        "accessories",
        "39.00",
        60,
        "Aluminium, adjustable height.",
    ),
];

/// Loads the sample products; ones whose SKU exists are skipped. Returns how many were added.
pub async fn load_sample_catalog(store: &dyn Store, currency: Currency) -> anyhow::Result<usize> {
    let mut added = 0;
    for (sku, name, category, price, stock, description) in SAMPLE {
        let product = NewProduct {
            id: ProductId::new(),
            sku: Some((*sku).to_string()),
            name: (*name).to_string(),
            description: Some((*description).to_string()),
            category: Some((*category).to_string()),
            price: Money::parse_decimal(price, currency).map_err(anyhow::Error::msg)?,
            stock: *stock,
        };
        match store.create_product(&product, crate::clock::now()).await {
            Ok(_) => added += 1,
            Err(StoreError::Conflict(_)) => {}
            Err(error) => return Err(error.into()),
        }
    }
    Ok(added)
}
