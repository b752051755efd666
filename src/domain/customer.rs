//! Customers: the people orders belong to. For a customer principal the token's `sub` *is* the
//! customer id, which is how ownership checks work without a lookup.

use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};

use super::ids::CustomerId;
use super::validation;

pub const EMAIL_MAX: usize = 254;
/// Longest local part (before the `@`), as RFC 5321 allows.
pub const EMAIL_LOCAL_MAX: usize = 64;
pub const PERSON_NAME_MAX: usize = 100;

/// A syntactically valid e-mail address, lower-cased so uniqueness is case-insensitive.
#[derive(Clone, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(transparent)]
pub struct Email(String);

impl Email {
    pub fn parse(value: &str) -> Result<Self, String> {
        let value = value.trim();
        let invalid = || "must be an e-mail address such as jane@example.com".to_string();
        if value.len() > EMAIL_MAX {
            return Err(format!("must be at most {EMAIL_MAX} characters"));
        }
        let (local, domain) = value.rsplit_once('@').ok_or_else(invalid)?;
        let domain_ok = domain.contains('.')
            && !domain.starts_with('.')
            && !domain.ends_with('.')
            && !domain.contains("..")
            && domain.chars().all(|c| c.is_alphanumeric() || c == '-' || c == '.');
        let local_ok = !local.is_empty()
            && local.len() <= EMAIL_LOCAL_MAX
            && !local.contains('@')
            && local.chars().all(|c| !c.is_whitespace() && !c.is_control());
        if !domain_ok || !local_ok {
            return Err(invalid());
        }
        Ok(Email(value.to_lowercase()))
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Customer {
    pub id: CustomerId,
    pub email: Email,
    pub first_name: String,
    pub last_name: String,
    pub created_at: DateTime<Utc>,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct NewCustomer {
    pub id: CustomerId,
    pub email: Email,
    pub first_name: String,
    pub last_name: String,
}

pub fn parse_person_name(value: &str) -> Result<String, String> {
    validation::text(value, PERSON_NAME_MAX)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn emails() {
        assert_eq!(Email::parse(" Jane@Example.COM ").unwrap().as_str(), "jane@example.com");
        for bad in [
            "",
            "jane",
            "@example.com",
            "jane@",
            "jane@example",
            "ja ne@example.com",
            "jane@ex..com",
        ] {
            assert!(Email::parse(bad).is_err(), "{bad:?} should be rejected");
        }
    }
}
