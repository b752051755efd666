//! Bearer-token authentication and the principal it yields.
//!
//! Today: HS256 tokens signed with the configured (or generated) secret, as minted by
//! `orderflow token`. The algorithm comes from configuration, never from the token header.
//! [`Authenticator`] is the one place that turns a header into a [`Principal`], so RS256/ES256
//! keys from a JWKS slot in here without touching handlers.

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use axum::extract::FromRequestParts;
use axum::http::header;
use axum::http::request::Parts;
use jsonwebtoken::{Algorithm, DecodingKey, EncodingKey, Header, Validation};
use serde::{Deserialize, Serialize};

use super::AppState;
use super::error::ApiError;
use crate::domain::CustomerId;

/// Issuer and audience of the development tokens `orderflow token` mints.
pub const DEV_ISSUER: &str = "orderflow";
pub const DEV_AUDIENCE: &str = "orderflow";
/// Clock skew tolerated on `exp`/`nbf`.
const LEEWAY_SECS: u64 = 30;

/// A signing secret that never prints.
#[derive(Clone)]
pub struct Secret(Vec<u8>);

impl Secret {
    pub fn new(bytes: Vec<u8>) -> Self {
        Self(bytes)
    }
}

impl std::fmt::Debug for Secret {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Secret(***)")
    }
}

/// The claims orderflow reads.
#[derive(Debug, Serialize, Deserialize)]
struct Claims {
    sub: String,
    exp: u64,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    nbf: Option<u64>,
    #[serde(default)]
    iat: Option<u64>,
    iss: String,
    aud: String,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    roles: Vec<String>,
    #[serde(default, rename = "cognito:groups", skip_serializing_if = "Vec::is_empty")]
    cognito_groups: Vec<String>,
}

/// Verifies bearer tokens (and, in development mode, mints them).
pub struct Authenticator {
    decoding: DecodingKey,
    encoding: EncodingKey,
    validation: Validation,
}

impl Authenticator {
    /// HS256 with a shared secret.
    pub fn hs256(secret: &Secret) -> Self {
        let mut validation = Validation::new(Algorithm::HS256);
        validation.set_issuer(&[DEV_ISSUER]);
        validation.set_audience(&[DEV_AUDIENCE]);
        validation.set_required_spec_claims(&["exp", "sub", "iss", "aud"]);
        validation.leeway = LEEWAY_SECS;
        validation.validate_nbf = true;
        Self {
            decoding: DecodingKey::from_secret(&secret.0),
            encoding: EncodingKey::from_secret(&secret.0),
            validation,
        }
    }

    /// Mints a token for `subject` with `roles`, valid for `ttl`.
    pub fn issue(&self, subject: &str, roles: &[String], ttl: Duration) -> anyhow::Result<String> {
        let now = SystemTime::now().duration_since(UNIX_EPOCH)?.as_secs();
        let claims = Claims {
            sub: subject.to_string(),
            exp: now + ttl.as_secs(),
            nbf: None,
            iat: Some(now),
            iss: DEV_ISSUER.into(),
            aud: DEV_AUDIENCE.into(),
            roles: roles.to_vec(),
            cognito_groups: Vec::new(),
        };
        Ok(jsonwebtoken::encode(
            &Header::new(Algorithm::HS256),
            &claims,
            &self.encoding,
        )?)
    }

    /// Checks a token and returns who it speaks for.
    pub fn verify(&self, token: &str) -> Result<Principal, ApiError> {
        let data = jsonwebtoken::decode::<Claims>(token, &self.decoding, &self.validation).map_err(|error| {
            use jsonwebtoken::errors::ErrorKind;
            let reason = match error.kind() {
                ErrorKind::ExpiredSignature => "the token has expired",
                ErrorKind::ImmatureSignature => "the token is not valid yet",
                ErrorKind::InvalidIssuer => "wrong issuer",
                ErrorKind::InvalidAudience => "wrong audience",
                ErrorKind::InvalidSignature => "bad signature",
                ErrorKind::InvalidAlgorithm => "algorithm not accepted",
                ErrorKind::MissingRequiredClaim(_) => "a required claim is missing",
                _ => "malformed token",
            };
            ApiError::unauthorized(reason)
        })?;
        let claims = data.claims;
        if claims.sub.trim().is_empty() {
            return Err(ApiError::unauthorized("a required claim is missing"));
        }
        let mut roles = claims.roles;
        roles.extend(claims.cognito_groups);
        Ok(Principal {
            subject: claims.sub,
            roles,
        })
    }
}

/// Who is calling: the token's subject and roles.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Principal {
    pub subject: String,
    pub roles: Vec<String>,
}

impl Principal {
    pub fn is_admin(&self) -> bool {
        self.roles.iter().any(|role| role == "admin")
    }

    /// The customer this principal is, when its subject is a customer id.
    pub fn customer_id(&self) -> Option<CustomerId> {
        self.subject.parse().ok()
    }

    /// Whether this principal may see the given customer's data.
    pub fn may_access(&self, customer: CustomerId) -> bool {
        self.is_admin() || self.customer_id() == Some(customer)
    }
}

impl FromRequestParts<AppState> for Principal {
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, state: &AppState) -> Result<Self, ApiError> {
        let header = parts
            .headers
            .get(header::AUTHORIZATION)
            .ok_or_else(|| ApiError::unauthorized("missing"))?;
        let token = header
            .to_str()
            .ok()
            .and_then(|value| value.strip_prefix("Bearer ").or_else(|| value.strip_prefix("bearer ")))
            .map(str::trim)
            .ok_or_else(|| ApiError::unauthorized("expected the Bearer scheme"))?;
        state.auth.verify(token)
    }
}

/// A principal with the `admin` role; others get 403.
pub struct Admin(pub Principal);

impl FromRequestParts<AppState> for Admin {
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, state: &AppState) -> Result<Self, ApiError> {
        let principal = Principal::from_request_parts(parts, state).await?;
        if !principal.is_admin() {
            return Err(ApiError::forbidden("this action needs the admin role"));
        }
        Ok(Admin(principal))
    }
}

/// Parses a duration such as `90s`, `30m`, `1h`, `7d`.
pub fn parse_ttl(text: &str) -> Result<Duration, String> {
    let text = text.trim();
    let split = text.find(|c: char| !c.is_ascii_digit()).unwrap_or(text.len());
    let (number, unit) = text.split_at(split);
    let number: u64 = number
        .parse()
        .map_err(|_| format!("`{text}` is not a duration like 30m, 1h or 7d"))?;
    let seconds = match unit {
        "s" | "" => number,
        "m" => number * 60,
        "h" => number * 3600,
        "d" => number * 86_400,
        _ => return Err(format!("`{text}` has an unknown unit; use s, m, h or d")),
    };
    if seconds == 0 {
        return Err("the duration must be positive".into());
    }
    Ok(Duration::from_secs(seconds))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trip_and_rejections() {
        let auth = Authenticator::hs256(&Secret::new(b"0123456789abcdef0123456789abcdef".to_vec()));
        let token = auth.issue("alice", &["admin".into()], Duration::from_secs(60)).unwrap();
        let principal = auth.verify(&token).unwrap();
        assert!(principal.is_admin());
        assert_eq!(principal.subject, "alice");

        let other = Authenticator::hs256(&Secret::new(b"another-secret-another-secret-xx".to_vec()));
        assert_eq!(other.verify(&token).unwrap_err().status(), 401);
        assert_eq!(auth.verify("garbage").unwrap_err().status(), 401);
    }

    #[test]
    fn ttl_parsing() {
        assert_eq!(parse_ttl("1h"), Ok(Duration::from_secs(3600)));
        assert_eq!(parse_ttl("90s"), Ok(Duration::from_secs(90)));
        assert!(parse_ttl("1w").is_err());
        assert!(parse_ttl("0m").is_err());
    }
}
