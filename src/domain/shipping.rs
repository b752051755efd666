//! Where an order ships: a postal address given with the checkout, validated field by field.
//!
//! Every text field is one trimmed line (no control characters, tabs or line breaks: an address
//! line is one line on a label or in a carrier's API) with a limit declared here once and
//! published in the API schema; `postal_code` is letters, digits, spaces and hyphens; `country`
//! is an assigned ISO 3166-1 alpha-2 code, checked against [`COUNTRY_CODES`].

use std::fmt;

use serde::{Deserialize, Deserializer, Serialize, Serializer};

use super::validation;

/// Longest recipient name (`name`), in characters as sent.
pub const RECIPIENT_MAX: usize = 200;
/// Longest street line (`line1`, `line2`).
pub const ADDRESS_LINE_MAX: usize = 200;
/// Longest `city`.
pub const CITY_MAX: usize = 100;
/// Longest `region` (state, province, county).
pub const REGION_MAX: usize = 100;
/// Longest `postal_code`.
pub const POSTAL_CODE_MAX: usize = 16;
/// [`parse_postal_code`]'s character rule as the regular expression the API schema publishes:
/// letters, digits, spaces and hyphens, with at least one letter or digit.
pub const POSTAL_CODE_PATTERN: &str = "^[A-Za-z0-9 -]*[A-Za-z0-9][A-Za-z0-9 -]*$";

/// Every officially assigned ISO 3166-1 alpha-2 code (249), in alphabetical order (searched by
/// bisection). Reserved and user-assigned codes (`EU`, `UK`, `XK`, `ZZ`, …) are not addresses.
pub const COUNTRY_CODES: [&str; 249] = [
    "AD", "AE", "AF", "AG", "AI", "AL", "AM", "AO", "AQ", "AR", "AS", "AT", "AU", "AW", "AX", "AZ", "BA", "BB", "BD",
    "BE", "BF", "BG", "BH", "BI", "BJ", "BL", "BM", "BN", "BO", "BQ", "BR", "BS", "BT", "BV", "BW", "BY", "BZ", "CA",
    "CC", "CD", "CF", "CG", "CH", "CI", "CK", "CL", "CM", "CN", "CO", "CR", "CU", "CV", "CW", "CX", "CY", "CZ", "DE",
    "DJ", "DK", "DM", "DO", "DZ", "EC", "EE", "EG", "EH", "ER", "ES", "ET", "FI", "FJ", "FK", "FM", "FO", "FR", "GA",
    "GB", "GD", "GE", "GF", "GG", "GH", "GI", "GL", "GM", "GN", "GP", "GQ", "GR", "GS", "GT", "GU", "GW", "GY", "HK",
    "HM", "HN", "HR", "HT", "HU", "ID", "IE", "IL", "IM", "IN", "IO", "IQ", "IR", "IS", "IT", "JE", "JM", "JO", "JP",
    "KE", "KG", "KH", "KI", "KM", "KN", "KP", "KR", "KW", "KY", "KZ", "LA", "LB", "LC", "LI", "LK", "LR", "LS", "LT",
    "LU", "LV", "LY", "MA", "MC", "MD", "ME", "MF", "MG", "MH", "MK", "ML", "MM", "MN", "MO", "MP", "MQ", "MR", "MS",
    "MT", "MU", "MV", "MW", "MX", "MY", "MZ", "NA", "NC", "NE", "NF", "NG", "NI", "NL", "NO", "NP", "NR", "NU", "NZ",
    "OM", "PA", "PE", "PF", "PG", "PH", "PK", "PL", "PM", "PN", "PR", "PS", "PT", "PW", "PY", "QA", "RE", "RO", "RS",
    "RU", "RW", "SA", "SB", "SC", "SD", "SE", "SG", "SH", "SI", "SJ", "SK", "SL", "SM", "SN", "SO", "SR", "SS", "ST",
    "SV", "SX", "SY", "SZ", "TC", "TD", "TF", "TG", "TH", "TJ", "TK", "TL", "TM", "TN", "TO", "TR", "TT", "TV", "TW",
    "TZ", "UA", "UG", "UM", "US", "UY", "UZ", "VA", "VC", "VE", "VG", "VI", "VN", "VU", "WF", "WS", "YE", "YT", "ZA",
    "ZM", "ZW",
];

/// An assigned ISO 3166-1 alpha-2 country code, upper case (`US`, `DE`, `JP`).
#[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct CountryCode(&'static str);

impl CountryCode {
    /// Exactly two upper-case letters naming an assigned code; nothing is trimmed or
    /// upper-cased (an identifier is taken as sent, like a SKU).
    pub fn parse(value: &str) -> Result<Self, String> {
        if value.len() != 2 || !value.bytes().all(|b| b.is_ascii_uppercase()) {
            return Err("must be an ISO 3166-1 alpha-2 country code: two upper-case letters, such as US".into());
        }
        COUNTRY_CODES
            .binary_search(&value)
            .map(|at| CountryCode(COUNTRY_CODES[at]))
            .map_err(|_| format!("`{value}` is not an assigned ISO 3166-1 alpha-2 country code"))
    }

    pub fn as_str(self) -> &'static str {
        self.0
    }
}

impl fmt::Debug for CountryCode {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.0)
    }
}

impl fmt::Display for CountryCode {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.0)
    }
}

impl Serialize for CountryCode {
    fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        serializer.serialize_str(self.0)
    }
}

impl<'de> Deserialize<'de> for CountryCode {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        let value = String::deserialize(deserializer)?;
        CountryCode::parse(&value).map_err(serde::de::Error::custom)
    }
}

/// The address an order ships to, as the customer gave it (trimmed). Its JSON form is what the
/// order view, the order's events, the idempotency snapshot and the `orders.shipping` column
/// hold; `line2` and `region` are `null` when not given.
#[derive(Clone, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct ShippingAddress {
    /// Who receives the parcel.
    pub name: String,
    pub line1: String,
    #[serde(default)]
    pub line2: Option<String>,
    pub city: String,
    /// State, province or county, where the country uses one.
    #[serde(default)]
    pub region: Option<String>,
    pub postal_code: String,
    pub country: CountryCode,
}

pub fn parse_recipient(value: &str) -> Result<String, String> {
    validation::single_line(value, RECIPIENT_MAX)
}

pub fn parse_address_line(value: &str) -> Result<String, String> {
    validation::single_line(value, ADDRESS_LINE_MAX)
}

pub fn parse_city(value: &str) -> Result<String, String> {
    validation::single_line(value, CITY_MAX)
}

pub fn parse_region(value: &str) -> Result<String, String> {
    validation::single_line(value, REGION_MAX)
}

/// 1 to [`POSTAL_CODE_MAX`] characters as sent, of [`POSTAL_CODE_PATTERN`]; returned trimmed.
pub fn parse_postal_code(value: &str) -> Result<String, String> {
    if value.chars().count() > POSTAL_CODE_MAX {
        return Err(format!("must be at most {POSTAL_CODE_MAX} characters"));
    }
    if !value.chars().all(|c| c.is_ascii_alphanumeric() || c == ' ' || c == '-') {
        return Err("must contain only letters, digits, spaces and hyphens".into());
    }
    if !value.chars().any(|c| c.is_ascii_alphanumeric()) {
        return Err("must contain a letter or digit".into());
    }
    Ok(value.trim().to_string())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn country_codes_are_the_assigned_ones_sorted() {
        assert!(
            COUNTRY_CODES.windows(2).all(|pair| pair[0] < pair[1]),
            "sorted, no repeats"
        );
        assert!(
            COUNTRY_CODES
                .iter()
                .all(|code| code.len() == 2 && code.bytes().all(|b| b.is_ascii_uppercase()))
        );
        for code in ["US", "DE", "JP", "GB", "AD", "ZW", "AX", "SS", "BQ"] {
            assert_eq!(CountryCode::parse(code).map(CountryCode::as_str), Ok(code));
        }
        for bad in [
            "us", "Us", "USA", "U", "", " US", "UK", "EU", "XK", "ZZ", "AA", "ÄB", "U1",
        ] {
            assert!(CountryCode::parse(bad).is_err(), "{bad:?} should be refused");
        }
    }

    #[test]
    fn postal_codes() {
        for (given, kept) in [
            ("12345", "12345"),
            ("SW1A 1AA", "SW1A 1AA"),
            ("00-950", "00-950"),
            (" K1A 0B1 ", "K1A 0B1"),
            ("1234567890123456", "1234567890123456"),
        ] {
            assert_eq!(parse_postal_code(given).as_deref(), Ok(kept));
        }
        for bad in ["", "   ", "--", "12345678901234567", "123_45", "12345\n", "1234é"] {
            assert!(parse_postal_code(bad).is_err(), "{bad:?} should be refused");
        }
    }

    #[test]
    fn lines_are_single_trimmed_text() {
        assert_eq!(parse_address_line("  1 Main St ").as_deref(), Ok("1 Main St"));
        assert_eq!(
            parse_recipient(&"é".repeat(RECIPIENT_MAX)).map(|s| s.chars().count()),
            Ok(RECIPIENT_MAX)
        );
        for bad in ["", "  ", "a\nb", "a\tb", "a\u{0}b", "a\u{85}b"] {
            assert!(parse_address_line(bad).is_err(), "{bad:?} should be refused");
        }
        assert!(parse_city(&"x".repeat(CITY_MAX + 1)).is_err());
        assert!(parse_region(&"x".repeat(REGION_MAX + 1)).is_err());
    }

    #[test]
    fn json_round_trips_and_old_forms_decode() {
        let address = ShippingAddress {
            name: "Jane Doe".into(),
            line1: "1 Main St".into(),
            line2: None,
            city: "Springfield".into(),
            region: Some("IL".into()),
            postal_code: "62701".into(),
            country: CountryCode::parse("US").unwrap(),
        };
        let text = serde_json::to_string(&address).unwrap();
        assert_eq!(
            text,
            r#"{"name":"Jane Doe","line1":"1 Main St","line2":null,"city":"Springfield","region":"IL","postal_code":"62701","country":"US"}"#
        );
        assert_eq!(serde_json::from_str::<ShippingAddress>(&text).unwrap(), address);
        let unassigned = text.replace("\"US\"", "\"ZZ\"");
        assert!(serde_json::from_str::<ShippingAddress>(&unassigned).is_err());
    }
}
