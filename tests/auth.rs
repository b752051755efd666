//! Bearer tokens from a real identity provider: a test IdP served over HTTP on 127.0.0.1 publishes
//! its keys at `/.well-known/jwks.json` (which the test can change, and which counts its requests)
//! and signs tokens with the committed test keys in `tests/fixtures/jwt/`. The API is driven over
//! its real socket: valid RS256/ES256 tokens get in, every forged, stale, misdirected or malformed
//! one gets 401 with a Bearer challenge, key rotation needs no restart, and a flood of made-up key
//! ids costs the IdP one request. The last tests start the real binary with `--jwks-url`.

mod common;

use std::process::Stdio;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use axum::Json;
use axum::extract::State;
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use common::{Backend, TestApp};
use jsonwebtoken::jwk::{Jwk, PublicKeyUse};
use jsonwebtoken::{Algorithm, EncodingKey, Header};
use orderflow::http::Authenticator;
use orderflow::http::auth::{ClaimRules, JwksSettings, JwksSource, JwtAlgorithm};
use serde_json::{Value, json};
use tokio::io::{AsyncBufReadExt, BufReader};
use uuid::Uuid;

const ISSUER: &str = "https://idp.test/realms/shop";
const AUDIENCE: &str = "orderflow-api";
const RSA_1: &[u8] = include_bytes!("fixtures/jwt/rsa-1.der");
const RSA_2: &[u8] = include_bytes!("fixtures/jwt/rsa-2.der");
const RSA_1_PUBLIC_PEM: &[u8] = include_bytes!("fixtures/jwt/rsa-1-public.pem");
const EC_1: &[u8] = include_bytes!("fixtures/jwt/ec-1.der");

/// One of the IdP's signing keys.
#[derive(Clone)]
struct TestKey {
    kid: String,
    alg: Algorithm,
    encoding: EncodingKey,
}

impl TestKey {
    fn rsa(kid: &str, der: &[u8]) -> Self {
        Self {
            kid: kid.into(),
            alg: Algorithm::RS256,
            encoding: EncodingKey::from_rsa_der(der),
        }
    }

    fn ec(kid: &str, der: &[u8]) -> Self {
        Self {
            kid: kid.into(),
            alg: Algorithm::ES256,
            encoding: EncodingKey::from_ec_der(der),
        }
    }

    /// The public half as a JWK, as providers publish it.
    fn jwk(&self) -> Value {
        let mut jwk = Jwk::from_encoding_key(&self.encoding, self.alg).expect("public JWK");
        jwk.common.key_id = Some(self.kid.clone());
        jwk.common.public_key_use = Some(PublicKeyUse::Signature);
        serde_json::to_value(jwk).expect("JWK as JSON")
    }

    /// This key under another `kid`.
    fn named(&self, kid: &str) -> Self {
        Self {
            kid: kid.into(),
            ..self.clone()
        }
    }

    fn sign(&self, claims: &Value) -> String {
        let mut header = Header::new(self.alg);
        header.kid = Some(self.kid.clone());
        jsonwebtoken::encode(&header, claims, &self.encoding).expect("sign")
    }
}

/// The test identity provider: a JWKS endpoint on a real socket.
struct IdentityProvider {
    url: String,
    keys: Arc<Mutex<Vec<Value>>>,
    fetches: Arc<AtomicUsize>,
    failing: Arc<AtomicBool>,
    _stop: tokio::sync::oneshot::Sender<()>,
}

#[derive(Clone)]
struct IdpState {
    keys: Arc<Mutex<Vec<Value>>>,
    fetches: Arc<AtomicUsize>,
    failing: Arc<AtomicBool>,
}

async fn jwks(State(idp): State<IdpState>) -> Response {
    idp.fetches.fetch_add(1, Ordering::SeqCst);
    if idp.failing.load(Ordering::SeqCst) {
        return StatusCode::SERVICE_UNAVAILABLE.into_response();
    }
    let keys = idp.keys.lock().unwrap().clone();
    Json(json!({ "keys": keys })).into_response()
}

impl IdentityProvider {
    async fn start(keys: &[&TestKey]) -> Self {
        let state = IdpState {
            keys: Arc::new(Mutex::new(keys.iter().map(|key| key.jwk()).collect())),
            fetches: Arc::new(AtomicUsize::new(0)),
            failing: Arc::new(AtomicBool::new(false)),
        };
        let app = axum::Router::new()
            .route("/.well-known/jwks.json", get(jwks))
            .with_state(state.clone());
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let url = format!("http://{}", listener.local_addr().unwrap());
        let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
        tokio::spawn(async move {
            axum::serve(listener, app)
                .with_graceful_shutdown(async move {
                    let _ = stopped.await;
                })
                .await
        });
        Self {
            url,
            keys: state.keys,
            fetches: state.fetches,
            failing: state.failing,
            _stop: stop,
        }
    }

    fn jwks_url(&self) -> String {
        format!("{}/.well-known/jwks.json", self.url)
    }

    fn publish(&self, keys: &[&TestKey]) {
        *self.keys.lock().unwrap() = keys.iter().map(|key| key.jwk()).collect();
    }

    fn fetches(&self) -> usize {
        self.fetches.load(Ordering::SeqCst)
    }

    /// Settings that load keys from this IdP, reloading on every unknown `kid`.
    fn settings(&self) -> JwksSettings {
        JwksSettings {
            min_refresh: Duration::ZERO,
            ..JwksSettings::new(JwksSource::Url(self.jwks_url().parse().unwrap()))
        }
    }
}

/// A version 4 UUID, as Cognito and Keycloak subjects are.
fn random_uuid() -> Uuid {
    uuid::Builder::from_random_bytes(rand::random()).into_uuid()
}

fn now() -> u64 {
    jsonwebtoken::get_current_timestamp()
}

fn rules() -> ClaimRules {
    let mut rules = ClaimRules::new(ISSUER, [AUDIENCE]);
    rules.leeway = Duration::from_secs(5);
    rules
}

/// Claims of a valid access token for `sub`.
fn claims(sub: &str) -> Value {
    json!({ "sub": sub, "iss": ISSUER, "aud": AUDIENCE, "iat": now(), "exp": now() + 600 })
}

fn with(mut claims: Value, extra: Value) -> Value {
    let object = claims.as_object_mut().unwrap();
    for (name, value) in extra.as_object().unwrap() {
        if value.is_null() {
            object.remove(name);
        } else {
            object.insert(name.clone(), value.clone());
        }
    }
    claims
}

/// The API over a fresh database, verifying tokens with `auth`.
async fn app_with(auth: Authenticator) -> TestApp {
    let auth = Arc::new(auth);
    TestApp::spawn_with(Backend::Sqlite, move |state| state.auth = auth).await
}

async fn status(app: &TestApp, path: &str, token: &str) -> StatusCode {
    app.get(path, Some(token)).await.status()
}

/// Asserts a 401 problem with a `WWW-Authenticate: Bearer …` challenge.
async fn assert_refused(app: &TestApp, token: &str, case: &str) {
    let response = app.get("/admin/queues", Some(token)).await;
    assert_eq!(response.status(), StatusCode::UNAUTHORIZED, "{case}");
    let challenge = response
        .headers()
        .get("www-authenticate")
        .unwrap_or_else(|| panic!("{case}: no WWW-Authenticate"))
        .to_str()
        .unwrap()
        .to_string();
    assert!(challenge.starts_with("Bearer"), "{case}: {challenge}");
    let body: Value = response.json().await.unwrap();
    assert_eq!(body["code"], "unauthorized", "{case}");
}

fn base64url(bytes: &[u8]) -> String {
    const ALPHABET: &[u8] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_";
    let mut out = String::new();
    for chunk in bytes.chunks(3) {
        let n = chunk
            .iter()
            .enumerate()
            .fold(0u32, |n, (i, b)| n | ((*b as u32) << (16 - 8 * i)));
        for i in 0..=chunk.len() {
            out.push(ALPHABET[((n >> (18 - 6 * i)) & 63) as usize] as char);
        }
    }
    out
}

/// Polls `condition` until it holds or `within` passes.
async fn eventually<F, Fut>(within: Duration, mut condition: F) -> bool
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    let deadline = Instant::now() + within;
    while Instant::now() < deadline {
        if condition().await {
            return true;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    false
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rs256_tokens_from_the_identity_provider_are_accepted() {
    let key = TestKey::rsa("rsa-1", RSA_1);
    let idp = IdentityProvider::start(&[&key]).await;
    let app = app_with(Authenticator::with_jwks(JwtAlgorithm::Rs256, idp.settings(), rules()).unwrap()).await;

    // A customer whose IdP subject is a UUID registers itself and reads its profile.
    let customer = random_uuid().to_string();
    let token = key.sign(&claims(&customer));
    let created = app
        .post(
            "/customers",
            Some(&token),
            &json!({ "email": "idp-user@example.com", "first_name": "Ida", "last_name": "P", "customer_id": customer }),
        )
        .await;
    assert_eq!(created.status(), StatusCode::CREATED);
    assert_eq!(
        status(&app, &format!("/customers/{customer}"), &token).await,
        StatusCode::OK
    );
    assert_eq!(status(&app, "/admin/queues", &token).await, StatusCode::FORBIDDEN);

    let admin = key.sign(&with(claims("ops@example.com"), json!({ "roles": ["admin"] })));
    assert_eq!(status(&app, "/admin/queues", &admin).await, StatusCode::OK);
    assert_eq!(
        status(&app, &format!("/customers/{customer}"), &admin).await,
        StatusCode::OK
    );
    // `aud` as an array holding this API, as Auth0 and Keycloak send it.
    let array_aud = key.sign(&with(
        claims("ops"),
        json!({ "aud": ["https://idp.test/userinfo", AUDIENCE], "roles": ["admin"] }),
    ));
    assert_eq!(status(&app, "/admin/queues", &array_aud).await, StatusCode::OK);
    assert_eq!(idp.fetches(), 1, "keys are cached after the first load");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn es256_tokens_are_accepted_and_rs256_ones_refused() {
    let ec = TestKey::ec("ec-1", EC_1);
    let rsa = TestKey::rsa("rsa-1", RSA_1);
    let idp = IdentityProvider::start(&[&ec, &rsa]).await;
    let app = app_with(Authenticator::with_jwks(JwtAlgorithm::Es256, idp.settings(), rules()).unwrap()).await;

    let admin = with(claims("ops"), json!({ "roles": ["admin"] }));
    assert_eq!(status(&app, "/admin/queues", &ec.sign(&admin)).await, StatusCode::OK);
    // The RSA key is published too, but ES256 is the configured algorithm.
    assert_refused(&app, &rsa.sign(&admin), "RS256 where ES256 is configured").await;
    assert_refused(&app, &rsa.named("ec-1").sign(&admin), "RS256 naming the EC key").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn forged_stale_misdirected_and_malformed_tokens_get_401() {
    let key = TestKey::rsa("rsa-1", RSA_1);
    let idp = IdentityProvider::start(&[&key]).await;
    let app = app_with(Authenticator::with_jwks(JwtAlgorithm::Rs256, idp.settings(), rules()).unwrap()).await;
    let admin = with(claims("ops"), json!({ "roles": ["admin"] }));
    // The baseline: the same claims, properly signed, get in.
    assert_eq!(status(&app, "/admin/queues", &key.sign(&admin)).await, StatusCode::OK);

    let impostor = TestKey::rsa("rsa-1", RSA_2);
    assert_refused(
        &app,
        &impostor.sign(&admin),
        "wrong signature (another key under the kid)",
    )
    .await;

    let signed = key.sign(&admin);
    let (_, rest) = signed.split_once('.').unwrap();
    let payload = rest.split_once('.').unwrap().0;
    let none_header = base64url(br#"{"alg":"none","typ":"JWT","kid":"rsa-1"}"#);
    assert_refused(&app, &format!("{none_header}.{payload}."), "alg none").await;
    let none_upper = base64url(br#"{"alg":"NONE","typ":"JWT","kid":"rsa-1"}"#);
    assert_refused(&app, &format!("{none_upper}.{payload}."), "alg NONE").await;

    // Algorithm confusion: HMAC with the RSA public key (as published) as the secret.
    let mut header = Header::new(Algorithm::HS256);
    header.kid = Some("rsa-1".into());
    let confused = jsonwebtoken::encode(&header, &admin, &EncodingKey::from_secret(RSA_1_PUBLIC_PEM)).unwrap();
    assert_refused(&app, &confused, "HS256 signed with the RSA public key").await;

    let cases = [
        ("expired", json!({ "exp": now() - 3600 })),
        ("expired beyond the leeway", json!({ "exp": now() - 60 })),
        ("not yet valid", json!({ "nbf": now() + 3600 })),
        ("no exp", json!({ "exp": null })),
        ("wrong issuer", json!({ "iss": "https://evil.test/realms/shop" })),
        ("issuer with a trailing slash", json!({ "iss": format!("{ISSUER}/") })),
        ("no issuer", json!({ "iss": null })),
        ("wrong audience", json!({ "aud": "another-api" })),
        ("wrong audiences", json!({ "aud": ["another-api", "a-third"] })),
        ("no audience", json!({ "aud": null })),
        ("missing sub", json!({ "sub": null })),
        ("empty sub", json!({ "sub": "" })),
    ];
    for (case, change) in cases {
        assert_refused(&app, &key.sign(&with(admin.clone(), change)), case).await;
    }
    for garbage in [
        "garbage",
        "a.b.c",
        "",
        "eyJhbGciOiJSUzI1NiJ9.e30.",
        &signed[..signed.len() - 4],
    ] {
        assert_refused(&app, garbage, &format!("garbage {garbage:?}")).await;
    }
    // Within the leeway an expired token still passes: the skew setting is honoured.
    let skewed = key.sign(&with(admin.clone(), json!({ "exp": now() - 1 })));
    assert_eq!(status(&app, "/admin/queues", &skewed).await, StatusCode::OK);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_rotated_key_is_picked_up_without_restart() {
    let old = TestKey::rsa("2024-01", RSA_1);
    let new = TestKey::rsa("2024-07", RSA_2);
    let idp = IdentityProvider::start(&[&old]).await;
    let app = app_with(Authenticator::with_jwks(JwtAlgorithm::Rs256, idp.settings(), rules()).unwrap()).await;
    let admin = with(claims("ops"), json!({ "roles": ["admin"] }));

    assert_eq!(status(&app, "/admin/queues", &old.sign(&admin)).await, StatusCode::OK);
    assert_refused(&app, &new.sign(&admin), "a key the IdP has not published").await;
    let before = idp.fetches();

    idp.publish(&[&old, &new]);
    assert_eq!(status(&app, "/admin/queues", &new.sign(&admin)).await, StatusCode::OK);
    assert_eq!(idp.fetches(), before + 1, "one reload for the new kid");
    // Both keys are now held: no further requests to the IdP.
    assert_eq!(status(&app, "/admin/queues", &old.sign(&admin)).await, StatusCode::OK);
    assert_eq!(status(&app, "/admin/queues", &new.sign(&admin)).await, StatusCode::OK);
    assert_eq!(idp.fetches(), before + 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_flood_of_unknown_kids_costs_one_fetch_per_interval() {
    let key = TestKey::rsa("rsa-1", RSA_1);
    let idp = IdentityProvider::start(&[&key]).await;
    let settings = JwksSettings {
        min_refresh: Duration::from_secs(3600),
        ..idp.settings()
    };
    let app = Arc::new(app_with(Authenticator::with_jwks(JwtAlgorithm::Rs256, settings, rules()).unwrap()).await);
    let admin = with(claims("ops"), json!({ "roles": ["admin"] }));

    // 200 concurrent requests naming made-up keys, before any key was loaded.
    let mut flood = tokio::task::JoinSet::new();
    for n in 0..200 {
        let app = app.clone();
        let token = key.named(&format!("made-up-{n}")).sign(&admin);
        flood.spawn(async move { app.get("/admin/queues", Some(&token)).await.status() });
    }
    while let Some(status) = flood.join_next().await {
        assert_eq!(status.unwrap(), StatusCode::UNAUTHORIZED);
    }
    assert_eq!(idp.fetches(), 1, "one load for the whole flood");
    // The key it loaded is in use; more unknown kids within the interval fetch nothing.
    assert_eq!(status(&app, "/admin/queues", &key.sign(&admin)).await, StatusCode::OK);
    for n in 0..20 {
        assert_refused(&app, &key.named(&format!("again-{n}")).sign(&admin), "unknown kid").await;
    }
    assert_eq!(idp.fetches(), 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stale_keys_are_reloaded_and_removed_ones_stop_working() {
    let old = TestKey::rsa("old", RSA_1);
    let new = TestKey::rsa("new", RSA_2);
    let idp = IdentityProvider::start(&[&old]).await;
    let settings = JwksSettings {
        refresh: Duration::ZERO,
        ..idp.settings()
    };
    let app = app_with(Authenticator::with_jwks(JwtAlgorithm::Rs256, settings, rules()).unwrap()).await;
    let admin = with(claims("ops"), json!({ "roles": ["admin"] }));
    let old_token = old.sign(&admin);
    assert_eq!(status(&app, "/admin/queues", &old_token).await, StatusCode::OK);

    // The IdP retires the old key; the next reload (in the background) drops it.
    idp.publish(&[&new]);
    let dropped = eventually(Duration::from_secs(10), || async {
        status(&app, "/admin/queues", &old_token).await == StatusCode::UNAUTHORIZED
    })
    .await;
    assert!(dropped, "a removed key kept working");
    assert_eq!(status(&app, "/admin/queues", &new.sign(&admin)).await, StatusCode::OK);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_identity_provider_outage_keeps_the_keys_held() {
    let key = TestKey::rsa("rsa-1", RSA_1);
    let idp = IdentityProvider::start(&[&key]).await;
    let app = app_with(Authenticator::with_jwks(JwtAlgorithm::Rs256, idp.settings(), rules()).unwrap()).await;
    let admin = with(claims("ops"), json!({ "roles": ["admin"] }));
    assert_eq!(status(&app, "/admin/queues", &key.sign(&admin)).await, StatusCode::OK);

    idp.failing.store(true, Ordering::SeqCst);
    assert_refused(
        &app,
        &key.named("unknown").sign(&admin),
        "unknown kid during the outage",
    )
    .await;
    assert!(idp.fetches() >= 2, "the unknown kid was looked up");
    assert_eq!(status(&app, "/admin/queues", &key.sign(&admin)).await, StatusCode::OK);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cognito_and_keycloak_tokens_work_with_configuration_only() {
    let key = TestKey::rsa("cognito-1", RSA_1);
    let idp = IdentityProvider::start(&[&key]).await;
    let pool = "https://cognito-idp.eu-west-1.amazonaws.com/eu-west-1_Test";
    let client_id = "3n4b5urk1ft4fl3mg5e62d9ado";
    let app = app_with(
        Authenticator::with_jwks(JwtAlgorithm::Rs256, idp.settings(), ClaimRules::new(pool, [client_id])).unwrap(),
    )
    .await;
    // A Cognito access token: no `aud`, the app client in `client_id`, groups in `cognito:groups`.
    let access = |groups: Value| {
        json!({
            "sub": random_uuid(), "iss": pool, "client_id": client_id, "token_use": "access",
            "scope": "openid", "username": "ida", "cognito:groups": groups,
            "iat": now(), "exp": now() + 600,
        })
    };
    assert_eq!(
        status(&app, "/admin/queues", &key.sign(&access(json!(["admin"])))).await,
        StatusCode::OK
    );
    assert_eq!(
        status(&app, "/admin/queues", &key.sign(&access(json!(["shoppers"])))).await,
        StatusCode::FORBIDDEN
    );
    let other_client = with(access(json!(["admin"])), json!({ "client_id": "another-client" }));
    assert_refused(&app, &key.sign(&other_client), "another app client").await;
    // A Cognito ID token: `aud` is the app client.
    let id_token = with(access(json!(["admin"])), json!({ "aud": client_id, "client_id": null }));
    assert_eq!(
        status(&app, "/admin/queues", &key.sign(&id_token)).await,
        StatusCode::OK
    );

    // Keycloak: roles in `realm_access.roles`, selected by configuration.
    let realm = "https://keycloak.test/realms/shop";
    let mut keycloak_rules = ClaimRules::new(realm, ["orderflow"]);
    keycloak_rules.roles_claims = vec!["realm_access.roles".into()];
    let app = app_with(Authenticator::with_jwks(JwtAlgorithm::Rs256, idp.settings(), keycloak_rules).unwrap()).await;
    let keycloak = |roles: Value| {
        json!({
            "sub": random_uuid(), "iss": realm, "aud": ["orderflow", "account"], "azp": "orderflow-web",
            "typ": "Bearer", "realm_access": { "roles": roles }, "iat": now(), "exp": now() + 600,
        })
    };
    assert_eq!(
        status(
            &app,
            "/admin/queues",
            &key.sign(&keycloak(json!(["admin", "offline_access"])))
        )
        .await,
        StatusCode::OK
    );
    assert_eq!(
        status(&app, "/admin/queues", &key.sign(&keycloak(json!(["offline_access"])))).await,
        StatusCode::FORBIDDEN
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn keys_from_a_jwks_file_are_used_and_re_read() {
    let first = TestKey::rsa("file-1", RSA_1);
    let second = TestKey::rsa("file-2", RSA_2);
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("jwks.json");
    let write = |keys: &[&TestKey]| {
        let keys: Vec<Value> = keys.iter().map(|key| key.jwk()).collect();
        std::fs::write(&path, json!({ "keys": keys }).to_string()).unwrap();
    };
    write(&[&first]);
    let settings = JwksSettings {
        min_refresh: Duration::ZERO,
        ..JwksSettings::new(JwksSource::File(path.clone()))
    };
    let auth = Authenticator::with_jwks(JwtAlgorithm::Rs256, settings, rules()).unwrap();
    assert_eq!(auth.load_keys().await.unwrap(), 1);
    let app = app_with(auth).await;
    let admin = with(claims("ops"), json!({ "roles": ["admin"] }));

    assert_eq!(status(&app, "/admin/queues", &first.sign(&admin)).await, StatusCode::OK);
    assert_refused(&app, &second.sign(&admin), "a key not in the file yet").await;
    write(&[&first, &second]);
    assert_eq!(
        status(&app, "/admin/queues", &second.sign(&admin)).await,
        StatusCode::OK
    );
}

// The real binary.

const BIN: &str = env!("CARGO_BIN_EXE_orderflow");

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_server_verifies_rs256_tokens_from_its_jwks_url() {
    let key = TestKey::rsa("rsa-1", RSA_1);
    let idp = IdentityProvider::start(&[&key]).await;
    let data = tempfile::tempdir().unwrap();
    let mut child = tokio::process::Command::new(BIN)
        .args(["serve", "--listen", "127.0.0.1:0", "--mode", "api", "--no-seed"])
        .arg("--data-dir")
        .arg(data.path())
        .args(["--jwt-algorithm", "rs256", "--jwks-url", &idp.jwks_url()])
        .args([
            "--jwt-issuer",
            ISSUER,
            "--jwt-audience",
            &format!("another-api,{AUDIENCE}"),
        ])
        .args(["--jwks-min-refresh", "0s"])
        .env_remove("ORDERFLOW_JWT_SECRET")
        .env("ORDERFLOW_LOG", "warn")
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .kill_on_drop(true)
        .spawn()
        .expect("start orderflow");
    let mut lines = BufReader::new(child.stdout.take().unwrap()).lines();
    let url = tokio::time::timeout(Duration::from_secs(30), async {
        while let Some(line) = lines.next_line().await.unwrap() {
            if let Some(rest) = line.strip_prefix("orderflow listening on ") {
                return rest.split_whitespace().next().unwrap().to_string();
            }
        }
        panic!("orderflow exited before listening")
    })
    .await
    .expect("orderflow did not start listening within 30 s");
    tokio::spawn(async move { while let Ok(Some(_)) = lines.next_line().await {} });
    assert_eq!(idp.fetches(), 1, "keys are loaded at start-up");

    let http = reqwest::Client::new();
    let get = |token: String| {
        let request = http.get(format!("{url}/admin/queues")).bearer_auth(token);
        async move { request.send().await.unwrap().status() }
    };
    let admin = with(claims("ops"), json!({ "roles": ["admin"] }));
    assert_eq!(get(key.sign(&admin)).await, StatusCode::OK);
    // A development token is not accepted by a server configured for an identity provider.
    let dev = Authenticator::hs256(&orderflow::http::Secret::new(vec![b'x'; 32]))
        .issue("ops", &["admin".into()], Duration::from_secs(60))
        .unwrap();
    assert_eq!(get(dev).await, StatusCode::UNAUTHORIZED);
    // Rotation reaches the running process.
    let rotated = TestKey::rsa("rsa-2", RSA_2);
    idp.publish(&[&key, &rotated]);
    assert_eq!(get(rotated.sign(&admin)).await, StatusCode::OK);
    child.start_kill().unwrap();
    child.wait().await.unwrap();
}

#[tokio::test]
async fn incomplete_identity_provider_configuration_stops_the_start() {
    let data = tempfile::tempdir().unwrap();
    let run = |args: &[&str]| {
        let mut command = tokio::process::Command::new(BIN);
        command
            .args(["--listen", "127.0.0.1:0", "--data-dir"])
            .arg(data.path())
            .args(args)
            .env_remove("ORDERFLOW_JWT_SECRET")
            .env_remove("ORDERFLOW_JWT_ALGORITHM")
            .env_remove("ORDERFLOW_JWKS_URL")
            .kill_on_drop(true);
        async move { command.output().await.unwrap() }
    };
    let cases: [(&[&str], &str); 5] = [
        (
            &[
                "--jwt-algorithm",
                "rs256",
                "--jwt-issuer",
                ISSUER,
                "--jwt-audience",
                AUDIENCE,
            ],
            "--jwks-url",
        ),
        (
            &[
                "--jwt-algorithm",
                "es256",
                "--jwks-url",
                "https://idp.test/jwks.json",
                "--jwt-audience",
                AUDIENCE,
            ],
            "--jwt-issuer",
        ),
        (
            &[
                "--jwt-algorithm",
                "rs256",
                "--jwks-url",
                "https://idp.test/jwks.json",
                "--jwt-issuer",
                ISSUER,
            ],
            "--jwt-audience",
        ),
        (&["--jwks-url", "https://idp.test/jwks.json"], "rs256"),
        (
            &[
                "token",
                "--sub",
                "ops",
                "--jwt-algorithm",
                "rs256",
                "--jwks-url",
                "https://idp.test/jwks.json",
            ],
            "identity provider",
        ),
    ];
    for (args, expected) in cases {
        let output = run(args).await;
        let stderr = String::from_utf8_lossy(&output.stderr);
        assert!(!output.status.success(), "{args:?} started");
        assert!(stderr.contains(expected), "{args:?}: {stderr}");
    }
    // A key file with no key for the configured algorithm is refused at start too.
    let file = data.path().join("jwks.json");
    std::fs::write(
        &file,
        json!({ "keys": [TestKey::rsa("rsa-1", RSA_1).jwk()] }).to_string(),
    )
    .unwrap();
    let es256_file = [
        "--jwt-algorithm",
        "es256",
        "--jwt-issuer",
        ISSUER,
        "--jwt-audience",
        AUDIENCE,
        "--jwks-file",
    ];
    let output = run(&[&es256_file[..], &[file.to_str().unwrap()]].concat()).await;
    assert!(!output.status.success());
    assert!(String::from_utf8_lossy(&output.stderr).contains("holds no"));
}
