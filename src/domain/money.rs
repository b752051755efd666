//! Exact money. Amounts are integer minor units (cents) of the store currency; on the wire they
//! are JSON numbers with at most the currency's minor digits (`199.99`). Parsing goes from the
//! number's *text* (serde_json's `arbitrary_precision`), never through binary floating point.

use std::fmt;
use std::str::FromStr;

use serde::{Deserialize, Serialize};

/// The most any single amount may be, in minor units (10^13: a hundred billion dollars).
/// Keeps every sum of up to 100 lines × 1000 units far inside `i64`.
pub const MAX_MINOR: i64 = 10_000_000_000_000;

/// An ISO 4217 currency with its number of minor digits.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(try_from = "String", into = "String")]
pub struct Currency {
    code: [u8; 3],
    minor_digits: u8,
}

impl Currency {
    pub const USD: Currency = Currency {
        code: *b"USD",
        minor_digits: 2,
    };

    pub fn code(&self) -> &str {
        // Only ASCII uppercase letters are ever stored.
        std::str::from_utf8(&self.code).unwrap_or("XXX")
    }

    pub fn minor_digits(&self) -> u8 {
        self.minor_digits
    }
}

impl FromStr for Currency {
    type Err = String;

    /// Accepts any three-letter ISO code; the few currencies without two minor digits are known.
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let upper = s.trim().to_ascii_uppercase();
        let bytes: [u8; 3] = upper
            .as_bytes()
            .try_into()
            .ok()
            .filter(|b: &[u8; 3]| b.iter().all(u8::is_ascii_uppercase))
            .ok_or_else(|| format!("`{s}` is not a three-letter ISO 4217 currency code"))?;
        let minor_digits = match &bytes {
            b"JPY" | b"KRW" | b"VND" | b"CLP" | b"ISK" | b"UGX" | b"XAF" | b"XOF" | b"PYG" => 0,
            b"BHD" | b"KWD" | b"OMR" | b"JOD" | b"TND" | b"IQD" | b"LYD" => 3,
            _ => 2,
        };
        Ok(Currency {
            code: bytes,
            minor_digits,
        })
    }
}

impl TryFrom<String> for Currency {
    type Error = String;
    fn try_from(value: String) -> Result<Self, Self::Error> {
        value.parse()
    }
}

impl From<Currency> for String {
    fn from(value: Currency) -> Self {
        value.code().to_string()
    }
}

impl fmt::Display for Currency {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.code())
    }
}

/// A non-negative amount in minor units of some currency (the currency travels beside it).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(transparent)]
pub struct Money(i64);

impl Money {
    pub const ZERO: Money = Money(0);

    pub fn from_minor(minor: i64) -> Result<Self, String> {
        if !(0..=MAX_MINOR).contains(&minor) {
            return Err(format!("must be between 0 and {MAX_MINOR} minor units"));
        }
        Ok(Money(minor))
    }

    pub fn minor(&self) -> i64 {
        self.0
    }

    /// Parses decimal text such as `199.99`, `5`, `0.5` exactly. Rejects exponents, signs,
    /// more fraction digits than the currency has, and values above [`MAX_MINOR`].
    pub fn parse_decimal(text: &str, currency: Currency) -> Result<Self, String> {
        let digits = usize::from(currency.minor_digits());
        let (whole, fraction) = match text.split_once('.') {
            Some((w, f)) => (w, f),
            None => (text, ""),
        };
        let all_digits = |s: &str| s.bytes().all(|b| b.is_ascii_digit());
        if whole.is_empty() || !all_digits(whole) || !all_digits(fraction) {
            if text.starts_with('-') {
                return Err("must not be negative".into());
            }
            return Err("must be a plain decimal number such as 19.99".into());
        }
        if text.contains('.') && fraction.is_empty() {
            return Err("must be a plain decimal number such as 19.99".into());
        }
        if fraction.len() > digits {
            return Err(format!(
                "must have at most {digits} decimal places for {}",
                currency.code()
            ));
        }
        let too_large = || format!("must be at most {}", Money(MAX_MINOR).to_decimal(currency));
        let whole: i64 = whole.parse().map_err(|_| too_large())?;
        let mut minor = whole.checked_mul(10_i64.pow(digits as u32)).ok_or_else(too_large)?;
        if !fraction.is_empty() {
            let scale = 10_i64.pow((digits - fraction.len()) as u32);
            let frac: i64 = fraction.parse().map_err(|_| too_large())?;
            minor = minor.checked_add(frac * scale).ok_or_else(too_large)?;
        }
        if minor > MAX_MINOR {
            return Err(too_large());
        }
        Ok(Money(minor))
    }

    /// Exact decimal text with exactly the currency's minor digits: `199.99`, `5.00`.
    pub fn to_decimal(&self, currency: Currency) -> String {
        decimal_text(self.0, currency)
    }

    /// The amount as a JSON number with the exact decimal text (no float on the way).
    pub fn to_json_number(&self, currency: Currency) -> serde_json::Number {
        serde_json::Number::from_str(&self.to_decimal(currency))
            .expect("decimal text of an integer amount is a valid JSON number")
    }

    pub fn checked_mul(&self, quantity: u32) -> Option<Money> {
        self.0.checked_mul(i64::from(quantity)).map(Money)
    }

    pub fn checked_add(&self, other: Money) -> Option<Money> {
        self.0.checked_add(other.0).map(Money)
    }
}

/// The exact decimal text of `minor` units of `currency`, sign included.
fn decimal_text(minor: i64, currency: Currency) -> String {
    let digits = u32::from(currency.minor_digits());
    if digits == 0 {
        return minor.to_string();
    }
    let scale = 10_u64.pow(digits);
    let (sign, magnitude) = (if minor < 0 { "-" } else { "" }, minor.unsigned_abs());
    format!(
        "{sign}{}.{:0width$}",
        magnitude / scale,
        magnitude % scale,
        width = digits as usize
    )
}

/// A sum of many amounts (a report's period), which may pass one [`Money`]'s bound, as an exact
/// JSON number like [`Money::to_json_number`].
pub fn sum_to_json_number(minor: i64, currency: Currency) -> serde_json::Number {
    serde_json::Number::from_str(&decimal_text(minor, currency))
        .expect("decimal text of an integer amount is a valid JSON number")
}

#[cfg(test)]
mod tests {
    use super::*;

    fn usd(text: &str) -> Result<i64, String> {
        Money::parse_decimal(text, Currency::USD).map(|m| m.minor())
    }

    #[test]
    fn parses_exact_decimals() {
        assert_eq!(usd("199.99"), Ok(19999));
        assert_eq!(usd("0.1"), Ok(10));
        assert_eq!(usd("5"), Ok(500));
        assert_eq!(usd("0"), Ok(0));
        // 0.1 + 0.2 style float artefacts cannot happen: this is integer arithmetic.
        assert_eq!(usd("0.30"), Ok(30));
    }

    #[test]
    fn rejects_what_is_not_exact_money() {
        assert!(usd("1.999").unwrap_err().contains("at most 2 decimal places"));
        assert!(usd("-1").unwrap_err().contains("negative"));
        assert!(usd("1e3").is_err());
        assert!(usd("1.").is_err());
        assert!(usd(".5").is_err());
        assert!(usd("99999999999999999999").is_err());
        assert!(usd("100000000000.01").is_err());
    }

    #[test]
    fn formats_with_currency_digits() {
        assert_eq!(Money(19999).to_decimal(Currency::USD), "199.99");
        assert_eq!(Money(500).to_decimal(Currency::USD), "5.00");
        let jpy: Currency = "jpy".parse().unwrap();
        assert_eq!(Money(500).to_decimal(jpy), "500");
        let kwd: Currency = "KWD".parse().unwrap();
        assert_eq!(Money(1).to_decimal(kwd), "0.001");
        assert_eq!(Money(19999).to_json_number(Currency::USD).to_string(), "199.99");
    }

    #[test]
    fn currency_codes() {
        assert!("US".parse::<Currency>().is_err());
        assert!("U$D".parse::<Currency>().is_err());
        assert_eq!("eur".parse::<Currency>().unwrap().code(), "EUR");
    }
}
