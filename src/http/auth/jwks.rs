//! An identity provider's public signing keys, from a JSON Web Key Set (RFC 7517) served at a URL
//! or kept in a file.
//!
//! Keys are held in memory and looked up by the token's `kid`. A `kid` the set does not hold means
//! the provider has rotated its keys, so the set is loaded again — but never more often than
//! `min_refresh`, and one load at a time, so a flood of tokens naming made-up keys costs the
//! provider at most one request per interval. The set is also reloaded in the background once it
//! is older than `refresh`, so removed keys stop being accepted. A failed load keeps the keys held.
//!
//! Only keys that fit the configured algorithm are kept (RSA for RS256, P-256 for ES256; a key
//! whose own `alg` or `use` says otherwise is skipped): the algorithm is configuration, and a key
//! set can never widen it. Keys embedded in a token (`jwk`, `jku`, `x5u` headers) are never used.

use std::fmt;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, PoisonError, RwLock};
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use jsonwebtoken::jwk::{AlgorithmParameters, EllipticCurve, Jwk, KeyAlgorithm, PublicKeyUse};
use jsonwebtoken::{Algorithm, DecodingKey};
use serde::Deserialize;

/// Largest key set accepted; real ones are a few KiB.
const MAX_JWKS_BYTES: usize = 1024 * 1024;

/// Where the key set comes from.
#[derive(Clone, Debug)]
pub enum JwksSource {
    /// Fetched with `GET` (e.g. `https://<issuer>/.well-known/jwks.json`).
    Url(reqwest::Url),
    /// Read from a file (e.g. mounted from a secret store).
    File(PathBuf),
}

impl fmt::Display for JwksSource {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            JwksSource::Url(url) => write!(f, "{url}"),
            JwksSource::File(path) => write!(f, "{}", path.display()),
        }
    }
}

/// How the key set is loaded and kept fresh.
#[derive(Clone, Debug)]
pub struct JwksSettings {
    pub source: JwksSource,
    /// Age after which the set is reloaded in the background.
    pub refresh: Duration,
    /// Least time between two loads (on unknown `kid`s or when stale).
    pub min_refresh: Duration,
    /// Longest time one fetch may take.
    pub timeout: Duration,
}

impl JwksSettings {
    /// The defaults of the command line: reload hourly, at most every 30 s, 5 s per fetch.
    pub fn new(source: JwksSource) -> Self {
        Self {
            source,
            refresh: Duration::from_secs(3600),
            min_refresh: Duration::from_secs(30),
            timeout: Duration::from_secs(5),
        }
    }
}

/// One load's keys.
struct KeySet {
    keys: Vec<(Option<String>, Arc<DecodingKey>)>,
    /// When they were loaded; `None` before the first successful load.
    loaded_at: Option<Instant>,
}

impl KeySet {
    /// The key a token names. A token without `kid` may use the set's only key.
    fn find(&self, kid: Option<&str>) -> Option<Arc<DecodingKey>> {
        match kid {
            Some(kid) => self
                .keys
                .iter()
                .find(|(id, _)| id.as_deref() == Some(kid))
                .map(|(_, key)| key.clone()),
            None => match self.keys.as_slice() {
                [(_, only)] => Some(only.clone()),
                _ => None,
            },
        }
    }

    fn is_stale(&self, refresh: Duration) -> bool {
        self.loaded_at.is_none_or(|at| at.elapsed() >= refresh)
    }
}

/// The keys held, and the bookkeeping that bounds how often they are loaded.
pub(super) struct JwksCache {
    settings: JwksSettings,
    algorithm: Algorithm,
    client: reqwest::Client,
    keys: RwLock<Arc<KeySet>>,
    /// Held while loading, so loads never overlap; holds when the last load was attempted.
    last_attempt: tokio::sync::Mutex<Option<Instant>>,
    background_refresh: AtomicBool,
}

impl JwksCache {
    pub(super) fn new(algorithm: Algorithm, settings: JwksSettings) -> anyhow::Result<Self> {
        if !matches!(algorithm, Algorithm::RS256 | Algorithm::ES256) {
            bail!("a JWKS holds RS256 or ES256 keys, not {algorithm:?}");
        }
        let client = reqwest::Client::builder()
            .timeout(settings.timeout)
            .user_agent(concat!("orderflow/", env!("CARGO_PKG_VERSION")))
            .build()
            .context("building the JWKS client")?;
        Ok(Self {
            settings,
            algorithm,
            client,
            keys: RwLock::new(Arc::new(KeySet {
                keys: Vec::new(),
                loaded_at: None,
            })),
            last_attempt: tokio::sync::Mutex::new(None),
            background_refresh: AtomicBool::new(false),
        })
    }

    pub(super) fn source(&self) -> &JwksSource {
        &self.settings.source
    }

    /// Loads the set now, whatever the bound (start-up); returns how many usable keys it holds.
    pub(super) async fn load_now(&self) -> anyhow::Result<usize> {
        let mut last_attempt = self.last_attempt.lock().await;
        *last_attempt = Some(Instant::now());
        let set = Arc::new(self.load().await?);
        let count = set.keys.len();
        self.store(set);
        Ok(count)
    }

    /// The key for a token's `kid`, loading the set again (within the bound) when it is unknown.
    pub(super) async fn key(self: &Arc<Self>, kid: Option<&str>) -> Option<Arc<DecodingKey>> {
        let seen = self.snapshot();
        if let Some(key) = seen.find(kid) {
            if seen.is_stale(self.settings.refresh) {
                self.refresh_in_background();
            }
            return Some(key);
        }
        self.refresh_bounded(&seen).await.find(kid)
    }

    fn snapshot(&self) -> Arc<KeySet> {
        self.keys.read().unwrap_or_else(PoisonError::into_inner).clone()
    }

    fn store(&self, set: Arc<KeySet>) {
        *self.keys.write().unwrap_or_else(PoisonError::into_inner) = set;
    }

    /// Loads the set unless another request just did (or tried), or the last attempt was less
    /// than `min_refresh` ago; returns the keys in force afterwards.
    async fn refresh_bounded(&self, seen: &Arc<KeySet>) -> Arc<KeySet> {
        let mut last_attempt = self.last_attempt.lock().await;
        let current = self.snapshot();
        if !Arc::ptr_eq(&current, seen) {
            // Loaded while this request waited for the lock: that answer is fresh enough.
            return current;
        }
        if last_attempt.is_some_and(|at| at.elapsed() < self.settings.min_refresh) {
            return current;
        }
        *last_attempt = Some(Instant::now());
        match self.load().await {
            Ok(set) => {
                let set = Arc::new(set);
                self.store(set.clone());
                set
            }
            Err(error) => {
                tracing::warn!(
                    source = %self.settings.source,
                    error = format!("{error:#}"),
                    "could not load the token signing keys; keeping the ones held"
                );
                current
            }
        }
    }

    fn refresh_in_background(self: &Arc<Self>) {
        if self.background_refresh.swap(true, Ordering::AcqRel) {
            return;
        }
        let cache = self.clone();
        tokio::spawn(async move {
            let seen = cache.snapshot();
            if seen.is_stale(cache.settings.refresh) {
                cache.refresh_bounded(&seen).await;
            }
            cache.background_refresh.store(false, Ordering::Release);
        });
    }

    async fn load(&self) -> anyhow::Result<KeySet> {
        let bytes = match &self.settings.source {
            JwksSource::Url(url) => self.fetch(url).await?,
            JwksSource::File(path) => tokio::fs::read(path)
                .await
                .with_context(|| format!("reading {}", path.display()))?,
        };
        if bytes.len() > MAX_JWKS_BYTES {
            bail!("the key set is larger than {MAX_JWKS_BYTES} bytes");
        }
        let keys = parse_key_set(&bytes, self.algorithm)?;
        if keys.is_empty() {
            tracing::warn!(
                source = %self.settings.source,
                algorithm = ?self.algorithm,
                "the key set holds no key for the configured algorithm; every token will be refused"
            );
        } else {
            tracing::info!(source = %self.settings.source, keys = keys.len(), "loaded the token signing keys");
        }
        Ok(KeySet {
            keys,
            loaded_at: Some(Instant::now()),
        })
    }

    async fn fetch(&self, url: &reqwest::Url) -> anyhow::Result<Vec<u8>> {
        let mut response = self
            .client
            .get(url.clone())
            .header(reqwest::header::ACCEPT, "application/json")
            .send()
            .await
            .with_context(|| format!("fetching {url}"))?;
        let status = response.status();
        if !status.is_success() {
            bail!("{url} answered {status}");
        }
        let mut body = Vec::new();
        while let Some(chunk) = response.chunk().await.with_context(|| format!("reading {url}"))? {
            body.extend_from_slice(&chunk);
            if body.len() > MAX_JWKS_BYTES {
                bail!("{url} sent more than {MAX_JWKS_BYTES} bytes");
            }
        }
        Ok(body)
    }
}

/// The usable keys of a JWKS document. Keys of other types or uses are skipped, so a provider that
/// also publishes encryption keys (Keycloak) or keys of curves orderflow does not use still works.
fn parse_key_set(bytes: &[u8], algorithm: Algorithm) -> anyhow::Result<Vec<(Option<String>, Arc<DecodingKey>)>> {
    #[derive(Deserialize)]
    struct Document {
        keys: Vec<serde_json::Value>,
    }
    let document: Document =
        serde_json::from_slice(bytes).context("not a JSON Web Key Set (expected {\"keys\": [...]})")?;
    let mut keys = Vec::new();
    for value in document.keys {
        let Ok(jwk) = serde_json::from_value::<Jwk>(value) else {
            continue;
        };
        if !fits(&jwk, algorithm) {
            continue;
        }
        match DecodingKey::from_jwk(&jwk) {
            Ok(key) => keys.push((jwk.common.key_id.clone(), Arc::new(key))),
            Err(error) => tracing::warn!(kid = ?jwk.common.key_id, %error, "skipping a malformed key of the key set"),
        }
    }
    Ok(keys)
}

/// Whether a key may verify signatures of the configured algorithm.
fn fits(jwk: &Jwk, algorithm: Algorithm) -> bool {
    if matches!(
        jwk.common.public_key_use,
        Some(PublicKeyUse::Encryption | PublicKeyUse::Other(_))
    ) {
        return false;
    }
    let (expected, shape_fits) = match (algorithm, &jwk.algorithm) {
        (Algorithm::RS256, AlgorithmParameters::RSA(_)) => (KeyAlgorithm::RS256, true),
        (Algorithm::ES256, AlgorithmParameters::EllipticCurve(params)) => {
            (KeyAlgorithm::ES256, params.curve == EllipticCurve::P256)
        }
        _ => return false,
    };
    shape_fits && jwk.common.key_algorithm.is_none_or(|alg| alg == expected)
}

#[cfg(test)]
mod tests {
    use super::*;

    const RSA_KEY: &str = r#"{"kty":"RSA","kid":"r1","alg":"RS256","use":"sig","n":"7MSdOupJheZ274M1tw2II9YiIuPKfbSpnXuHkdyV1soCPhwfXhilJEGLvRBSjESHYfW35LN15aM_Vbbt6FnkQvpWLkTVPSFvqwY5zlDsVFOkuMvPGZXhZVoIHjTq51Hkzgdqjy-zRjAuyX3Nn968RtzDTy74O5rROLBe6OOkg83zQkTDM3QpBN6zMTs_ctKi5nxRiivbP_QRdYCC-OzoAaFPiSAb2xWsX7Ktl2WQSs40V1bVMz2L8I17dR69Tv2Bpgxz5Nj39d6UJcbEg3u4jV_bQUVvcvvivFFnsTZ9xlHJhjngOPtXlw-VnFRYb6NMU5LPGlvUS6h6ZyEjD1PECQ","e":"AQAB"}"#;

    #[test]
    fn only_keys_of_the_configured_algorithm_are_kept() {
        let document = format!(
            r#"{{"keys":[{RSA_KEY},
                {{"kty":"RSA","kid":"enc","alg":"RSA-OAEP","use":"enc","n":"sXch","e":"AQAB"}},
                {{"kty":"OKP","kid":"x","crv":"X25519","x":"abc"}},
                {{"kty":"oct","kid":"h","k":"c2VjcmV0"}},
                {{"kty":"EC","kid":"p384","crv":"P-384","x":"abc","y":"def"}}]}}"#
        );
        let rsa = parse_key_set(document.as_bytes(), Algorithm::RS256).unwrap();
        assert_eq!(rsa.len(), 1);
        assert_eq!(rsa[0].0.as_deref(), Some("r1"));
        assert!(parse_key_set(document.as_bytes(), Algorithm::ES256).unwrap().is_empty());
        assert!(parse_key_set(b"[]", Algorithm::RS256).is_err());
    }

    #[test]
    fn a_token_without_kid_may_use_the_only_key() {
        let keys = parse_key_set(format!(r#"{{"keys":[{RSA_KEY}]}}"#).as_bytes(), Algorithm::RS256).unwrap();
        let set = KeySet { keys, loaded_at: None };
        assert!(set.find(None).is_some());
        assert!(set.find(Some("r1")).is_some());
        assert!(set.find(Some("r2")).is_none());
        assert!(set.is_stale(Duration::from_secs(3600)));
    }
}
