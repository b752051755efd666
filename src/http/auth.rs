//! Bearer-token authentication and the principal it yields.
//!
//! Two ways to trust a token, chosen by configuration and never by the token:
//! - **HS256** (development, the default): signed with the shared secret, as minted by
//!   `orderflow token`; issuer and audience `orderflow` unless configured.
//! - **RS256 / ES256**: signed by an identity provider (Cognito, Auth0, Keycloak, …) whose public
//!   keys come from a JWKS URL or file ([`jwks`]); issuer and audience are required settings.
//!
//! Either way the header's `alg` must be the configured one (so `none`, and an HS256 token
//! "signed" with a public key, are refused), `exp` is required, `nbf` honoured, both with a small
//! leeway, the issuer must match exactly and the audience must be one of the accepted ones.
//! [`Authenticator`] is the one place that turns a header into a [`Principal`].

mod jwks;

use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use anyhow::bail;
use axum::extract::FromRequestParts;
use axum::http::header;
use axum::http::request::Parts;
use jsonwebtoken::{Algorithm, DecodingKey, EncodingKey, Header, Validation};
use serde::Serialize;
use serde_json::{Map, Value};

pub use self::jwks::{JwksSettings, JwksSource};
use super::AppState;
use super::edge::rate_limit::VerifiedPrincipal;
use super::error::ApiError;
use crate::domain::CustomerId;

/// Issuer and audience of the development tokens `orderflow token` mints.
pub const DEV_ISSUER: &str = "orderflow";
pub const DEV_AUDIENCE: &str = "orderflow";
/// Clock skew tolerated on `exp`/`nbf` by default.
pub const DEFAULT_LEEWAY: Duration = Duration::from_secs(30);
/// Where roles are read from by default: plain `roles`, and Cognito's groups.
pub const DEFAULT_ROLES_CLAIMS: [&str; 2] = ["roles", "cognito:groups"];

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

/// The one signature algorithm a server accepts.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum JwtAlgorithm {
    /// HMAC-SHA256 with the shared secret (development).
    Hs256,
    /// RSA PKCS#1 v1.5 with SHA-256, keys from a JWKS.
    Rs256,
    /// ECDSA P-256 with SHA-256, keys from a JWKS.
    Es256,
}

impl JwtAlgorithm {
    fn jwt(self) -> Algorithm {
        match self {
            JwtAlgorithm::Hs256 => Algorithm::HS256,
            JwtAlgorithm::Rs256 => Algorithm::RS256,
            JwtAlgorithm::Es256 => Algorithm::ES256,
        }
    }
}

/// What a token must claim, and where the principal is read from.
#[derive(Clone, Debug)]
pub struct ClaimRules {
    /// The exact `iss` required.
    pub issuer: String,
    /// Accepted audiences: the token's `aud` (a string or an array) must contain one. A token
    /// without `aud` is accepted when its `client_id` is one of them (Cognito access tokens).
    pub audiences: Vec<String>,
    /// Clock skew tolerated on `exp` and `nbf`.
    pub leeway: Duration,
    /// Claims holding roles (arrays of strings, or one string), each a top-level claim name or a
    /// dotted path into nested objects such as `realm_access.roles` (Keycloak).
    pub roles_claims: Vec<String>,
    /// The claim naming the principal (a top-level name or a dotted path); `sub` by default.
    /// `sub` itself is always required.
    pub subject_claim: String,
}

impl ClaimRules {
    /// Those of `orderflow token`: issuer and audience `orderflow`, roles from `roles` or
    /// `cognito:groups`, 30 s leeway.
    pub fn development() -> Self {
        Self::new(DEV_ISSUER, [DEV_AUDIENCE])
    }

    /// The given issuer and audiences with the default leeway, roles and subject claims.
    pub fn new(issuer: impl Into<String>, audiences: impl IntoIterator<Item = impl Into<String>>) -> Self {
        Self {
            issuer: issuer.into(),
            audiences: audiences.into_iter().map(Into::into).collect(),
            leeway: DEFAULT_LEEWAY,
            roles_claims: DEFAULT_ROLES_CLAIMS.iter().map(|claim| claim.to_string()).collect(),
            subject_claim: "sub".into(),
        }
    }
}

/// The claims `orderflow token` writes.
#[derive(Debug, Serialize)]
struct IssuedClaims<'a> {
    sub: &'a str,
    exp: u64,
    iat: u64,
    iss: &'a str,
    aud: &'a str,
    #[serde(skip_serializing_if = "<[String]>::is_empty")]
    roles: &'a [String],
}

/// Where verification keys come from.
enum Keys {
    Secret {
        decoding: DecodingKey,
        encoding: EncodingKey,
    },
    Jwks(Arc<jwks::JwksCache>),
}

/// Verifies bearer tokens (and, in development mode, mints them).
pub struct Authenticator {
    algorithm: JwtAlgorithm,
    keys: Keys,
    rules: ClaimRules,
    validation: Validation,
}

impl Authenticator {
    /// HS256 with a shared secret and the development claims (`orderflow token`'s).
    pub fn hs256(secret: &Secret) -> Self {
        Self::with_secret(secret, ClaimRules::development())
    }

    /// HS256 with a shared secret.
    pub fn with_secret(secret: &Secret, rules: ClaimRules) -> Self {
        Self {
            algorithm: JwtAlgorithm::Hs256,
            validation: validation(JwtAlgorithm::Hs256, &rules),
            keys: Keys::Secret {
                decoding: DecodingKey::from_secret(&secret.0),
                encoding: EncodingKey::from_secret(&secret.0),
            },
            rules,
        }
    }

    /// RS256 or ES256 with an identity provider's keys. Nothing is loaded until
    /// [`load_keys`](Self::load_keys) or the first token.
    pub fn with_jwks(algorithm: JwtAlgorithm, jwks: JwksSettings, rules: ClaimRules) -> anyhow::Result<Self> {
        if algorithm == JwtAlgorithm::Hs256 {
            bail!("HS256 tokens are verified with the shared secret, not a JWKS");
        }
        if rules.issuer.is_empty() || rules.audiences.is_empty() {
            bail!("tokens from an identity provider need a required issuer and at least one audience");
        }
        Ok(Self {
            algorithm,
            validation: validation(algorithm, &rules),
            keys: Keys::Jwks(Arc::new(jwks::JwksCache::new(algorithm.jwt(), jwks)?)),
            rules,
        })
    }

    /// The accepted algorithm.
    pub fn algorithm(&self) -> JwtAlgorithm {
        self.algorithm
    }

    /// Where the keys come from: the JWKS URL or file, `None` for the shared secret.
    pub fn key_source(&self) -> Option<&JwksSource> {
        match &self.keys {
            Keys::Secret { .. } => None,
            Keys::Jwks(cache) => Some(cache.source()),
        }
    }

    /// Loads the identity provider's keys now (at start-up); returns how many fit the algorithm.
    /// With the shared secret there is nothing to load.
    pub async fn load_keys(&self) -> anyhow::Result<usize> {
        match &self.keys {
            Keys::Secret { .. } => Ok(0),
            Keys::Jwks(cache) => cache.load_now().await,
        }
    }

    /// Mints a token for `subject` with `roles`, valid for `ttl` (HS256 development mode only).
    pub fn issue(&self, subject: &str, roles: &[String], ttl: Duration) -> anyhow::Result<String> {
        let Keys::Secret { encoding, .. } = &self.keys else {
            bail!("orderflow mints HS256 development tokens only; RS256/ES256 tokens come from the identity provider");
        };
        let now = SystemTime::now().duration_since(UNIX_EPOCH)?.as_secs();
        let claims = IssuedClaims {
            sub: subject,
            exp: now + ttl.as_secs(),
            iat: now,
            iss: &self.rules.issuer,
            aud: self.rules.audiences.first().map_or(DEV_AUDIENCE, String::as_str),
            roles,
        };
        Ok(jsonwebtoken::encode(&Header::new(Algorithm::HS256), &claims, encoding)?)
    }

    /// Checks a token and returns who it speaks for. Every refusal is a 401 whose reason names
    /// the check that failed, never the token.
    pub async fn verify(&self, token: &str) -> Result<Principal, ApiError> {
        // Unparseable headers, including `"alg": "none"` (not an algorithm jsonwebtoken knows).
        let header = jsonwebtoken::decode_header(token).map_err(|_| ApiError::unauthorized("malformed token"))?;
        if header.alg != self.algorithm.jwt() {
            return Err(ApiError::unauthorized("algorithm not accepted"));
        }
        let fetched;
        let key = match &self.keys {
            Keys::Secret { decoding, .. } => decoding,
            Keys::Jwks(cache) => {
                fetched = cache
                    .key(header.kid.as_deref())
                    .await
                    .ok_or_else(|| ApiError::unauthorized("unknown signing key"))?;
                &*fetched
            }
        };
        let claims = jsonwebtoken::decode::<Map<String, Value>>(token, key, &self.validation)
            .map_err(|error| {
                use jsonwebtoken::errors::ErrorKind;
                ApiError::unauthorized(match error.kind() {
                    ErrorKind::ExpiredSignature => "the token has expired",
                    ErrorKind::ImmatureSignature => "the token is not valid yet",
                    ErrorKind::InvalidIssuer => "wrong issuer",
                    ErrorKind::InvalidSignature => "bad signature",
                    ErrorKind::InvalidAlgorithm => "algorithm not accepted",
                    ErrorKind::MissingRequiredClaim(_) => "a required claim is missing",
                    _ => "malformed token",
                })
            })?
            .claims;
        // jsonwebtoken also accepts an `iss` array holding the issuer; require the plain string.
        if claims.get("iss").and_then(Value::as_str) != Some(self.rules.issuer.as_str()) {
            return Err(ApiError::unauthorized("wrong issuer"));
        }
        if !self.audience_accepted(&claims) {
            return Err(ApiError::unauthorized("wrong audience"));
        }
        let subject = claim(&claims, "sub")
            .and(claim(&claims, &self.rules.subject_claim))
            .and_then(Value::as_str)
            .filter(|subject| !subject.trim().is_empty())
            .ok_or_else(|| ApiError::unauthorized("a required claim is missing"))?;
        let mut roles = Vec::new();
        for path in &self.rules.roles_claims {
            match claim(&claims, path) {
                Some(Value::Array(values)) => roles.extend(values.iter().filter_map(Value::as_str).map(String::from)),
                Some(Value::String(role)) => roles.push(role.clone()),
                _ => {}
            }
        }
        Ok(Principal {
            subject: subject.to_string(),
            roles,
        })
    }

    /// `aud` (a string or an array) names an accepted audience; without `aud`, `client_id` does
    /// (Cognito access tokens carry the app client there instead).
    fn audience_accepted(&self, claims: &Map<String, Value>) -> bool {
        let accepted = |value: &Value| {
            value
                .as_str()
                .is_some_and(|aud| self.rules.audiences.iter().any(|a| a == aud))
        };
        match claims.get("aud") {
            Some(Value::Array(values)) => values.iter().any(accepted),
            Some(value) => accepted(value),
            None => claims.get("client_id").is_some_and(accepted),
        }
    }
}

/// The checks jsonwebtoken makes: algorithm, signature, `exp` (required) and `nbf` with leeway,
/// issuer; `sub` present. Audience is checked by [`Authenticator::audience_accepted`].
fn validation(algorithm: JwtAlgorithm, rules: &ClaimRules) -> Validation {
    let mut validation = Validation::new(algorithm.jwt());
    validation.set_issuer(&[&rules.issuer]);
    validation.set_required_spec_claims(&["exp", "sub", "iss"]);
    validation.validate_aud = false;
    validation.leeway = rules.leeway.as_secs();
    validation.validate_nbf = true;
    validation
}

/// A claim by top-level name (`cognito:groups`, `https://example.com/roles`), else by dotted
/// path into nested objects (`realm_access.roles`).
fn claim<'a>(claims: &'a Map<String, Value>, path: &str) -> Option<&'a Value> {
    if let Some(value) = claims.get(path) {
        return Some(value);
    }
    let mut parts = path.split('.');
    let mut value = claims.get(parts.next()?)?;
    for part in parts {
        value = value.as_object()?.get(part)?;
    }
    Some(value)
}

/// Who is calling: the token's subject and roles.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Principal {
    pub subject: String,
    pub roles: Vec<String>,
}

impl Principal {
    pub fn is_admin(&self) -> bool {
        self.has_role("admin")
    }

    /// Whether the token grants `role` (e.g. `integrations` for the event feed).
    pub fn has_role(&self, role: &str) -> bool {
        self.roles.iter().any(|granted| granted == role)
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
        // The edge's rate limiter already verified this request's token: don't do it twice.
        if let Some(VerifiedPrincipal(principal)) = parts.extensions.get::<VerifiedPrincipal>() {
            return Ok(principal.clone());
        }
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
        state.auth.verify(token).await
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
    use serde_json::json;

    use super::*;

    const SECRET: &[u8] = b"0123456789abcdef0123456789abcdef";

    fn sign(claims: &Value) -> String {
        jsonwebtoken::encode(
            &Header::new(Algorithm::HS256),
            claims,
            &EncodingKey::from_secret(SECRET),
        )
        .unwrap()
    }

    fn in_an_hour() -> u64 {
        jsonwebtoken::get_current_timestamp() + 3600
    }

    #[tokio::test]
    async fn round_trip_and_rejections() {
        let auth = Authenticator::hs256(&Secret::new(SECRET.to_vec()));
        let token = auth.issue("alice", &["admin".into()], Duration::from_secs(60)).unwrap();
        let principal = auth.verify(&token).await.unwrap();
        assert!(principal.is_admin());
        assert_eq!(principal.subject, "alice");

        let other = Authenticator::hs256(&Secret::new(b"another-secret-another-secret-xx".to_vec()));
        assert_eq!(other.verify(&token).await.unwrap_err().status(), 401);
        assert_eq!(auth.verify("garbage").await.unwrap_err().status(), 401);
    }

    #[tokio::test]
    async fn configured_issuer_and_audience_are_minted_and_required() {
        let rules = ClaimRules::new("https://issuer.example", ["api-1", "api-2"]);
        let auth = Authenticator::with_secret(&Secret::new(SECRET.to_vec()), rules);
        let token = auth.issue("alice", &[], Duration::from_secs(60)).unwrap();
        assert_eq!(auth.verify(&token).await.unwrap().subject, "alice");
        let dev = Authenticator::hs256(&Secret::new(SECRET.to_vec()));
        assert_eq!(dev.verify(&token).await.unwrap_err().status(), 401);
    }

    #[tokio::test]
    async fn audience_may_be_an_array_or_a_cognito_client_id() {
        let auth = Authenticator::with_secret(
            &Secret::new(SECRET.to_vec()),
            ClaimRules::new("https://issuer.example", ["client-1"]),
        );
        let exp = in_an_hour();
        let base = json!({ "sub": "alice", "exp": exp, "iss": "https://issuer.example" });
        let with = |extra: Value| {
            let mut claims = base.clone();
            claims
                .as_object_mut()
                .unwrap()
                .extend(extra.as_object().unwrap().clone());
            sign(&claims)
        };
        let accepted = [
            with(json!({ "aud": "client-1" })),
            with(json!({ "aud": ["other", "client-1"] })),
            with(json!({ "client_id": "client-1", "token_use": "access" })),
        ];
        for token in accepted {
            assert!(auth.verify(&token).await.is_ok());
        }
        let refused = [
            with(json!({})),
            with(json!({ "aud": ["other"] })),
            with(json!({ "aud": "other", "client_id": "client-1" })),
            with(json!({ "aud": 7 })),
            with(json!({ "client_id": "client-2" })),
            with(json!({ "aud": "client-1", "iss": ["https://issuer.example"] })),
        ];
        for token in refused {
            assert_eq!(auth.verify(&token).await.unwrap_err().status(), 401);
        }
    }

    #[tokio::test]
    async fn roles_and_subject_come_from_the_configured_claims() {
        let exp = in_an_hour();
        let claims = json!({
            "sub": "auth0|abc", "exp": exp, "iss": "orderflow", "aud": "orderflow",
            "roles": ["reader"], "cognito:groups": ["admin"],
            "realm_access": { "roles": ["admin", "offline_access"] },
            "https://orderflow.example/roles": ["admin"],
            "https://orderflow.example/customer_id": "0199a0e5-0000-7000-8000-000000000001",
        });
        let token = sign(&claims);
        let secret = Secret::new(SECRET.to_vec());

        let default = Authenticator::hs256(&secret).verify(&token).await.unwrap();
        assert_eq!(default.roles, ["reader", "admin"]);
        assert_eq!(default.subject, "auth0|abc");

        let mut rules = ClaimRules::development();
        rules.roles_claims = vec!["realm_access.roles".into()];
        let keycloak = Authenticator::with_secret(&secret, rules).verify(&token).await.unwrap();
        assert_eq!(keycloak.roles, ["admin", "offline_access"]);

        let mut rules = ClaimRules::development();
        rules.roles_claims = vec!["https://orderflow.example/roles".into(), "missing.path".into()];
        rules.subject_claim = "https://orderflow.example/customer_id".into();
        let auth0 = Authenticator::with_secret(&secret, rules).verify(&token).await.unwrap();
        assert!(auth0.is_admin());
        assert!(auth0.customer_id().is_some());

        let mut rules = ClaimRules::development();
        rules.subject_claim = "custom:customer_id".into();
        let missing = Authenticator::with_secret(&secret, rules)
            .verify(&token)
            .await
            .unwrap_err();
        assert_eq!(missing.status(), 401);
    }

    #[tokio::test]
    async fn a_blank_or_missing_subject_is_refused() {
        let auth = Authenticator::hs256(&Secret::new(SECRET.to_vec()));
        let exp = in_an_hour();
        for claims in [
            json!({ "exp": exp, "iss": "orderflow", "aud": "orderflow" }),
            json!({ "sub": " ", "exp": exp, "iss": "orderflow", "aud": "orderflow" }),
            json!({ "sub": 42, "exp": exp, "iss": "orderflow", "aud": "orderflow" }),
        ] {
            assert_eq!(auth.verify(&sign(&claims)).await.unwrap_err().status(), 401);
        }
    }

    #[test]
    fn jwks_mode_needs_issuer_and_audience_and_mints_nothing() {
        let source = JwksSource::File("/nonexistent/jwks.json".into());
        let no_audience = ClaimRules::new("https://issuer.example", Vec::<String>::new());
        assert!(Authenticator::with_jwks(JwtAlgorithm::Rs256, JwksSettings::new(source.clone()), no_audience).is_err());
        let rules = ClaimRules::new("https://issuer.example", ["api"]);
        assert!(
            Authenticator::with_jwks(JwtAlgorithm::Hs256, JwksSettings::new(source.clone()), rules.clone()).is_err()
        );
        let auth = Authenticator::with_jwks(JwtAlgorithm::Es256, JwksSettings::new(source), rules).unwrap();
        assert!(auth.issue("alice", &[], Duration::from_secs(60)).is_err());
    }

    #[test]
    fn ttl_parsing() {
        assert_eq!(parse_ttl("1h"), Ok(Duration::from_secs(3600)));
        assert_eq!(parse_ttl("90s"), Ok(Duration::from_secs(90)));
        assert!(parse_ttl("1w").is_err());
        assert!(parse_ttl("0m").is_err());
    }
}
