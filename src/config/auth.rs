//! Token verification settings (`--jwt-*`, `--jwks-*`) and the [`Authenticator`] they build.
//! See `docs/auth.md` for pointing them at Cognito, Auth0 or Keycloak.

use std::path::PathBuf;
use std::time::Duration;

use anyhow::{Context, bail};
use clap::Args;

use super::{GlobalArgs, parse_duration};
use crate::http::Authenticator;
use crate::http::auth::{ClaimRules, DEV_AUDIENCE, DEV_ISSUER, JwksSettings, JwksSource, JwtAlgorithm};

#[derive(Debug, Args)]
pub struct AuthArgs {
    /// The one algorithm bearer tokens may be signed with: `hs256` (development: the shared
    /// `--jwt-secret`, tokens from `orderflow token`), or `rs256`/`es256` (an identity provider's
    /// keys from `--jwks-url` or `--jwks-file`). The token's own `alg` header is never trusted.
    #[arg(
        long,
        env = "ORDERFLOW_JWT_ALGORITHM",
        global = true,
        value_enum,
        default_value = "hs256"
    )]
    pub jwt_algorithm: JwtAlgorithm,
    /// URL of the identity provider's JSON Web Key Set, e.g.
    /// `https://cognito-idp.<region>.amazonaws.com/<pool-id>/.well-known/jwks.json`.
    #[arg(long, env = "ORDERFLOW_JWKS_URL", global = true)]
    pub jwks_url: Option<String>,
    /// A file holding the JSON Web Key Set (instead of `--jwks-url`); re-read like the URL is fetched.
    #[arg(long, env = "ORDERFLOW_JWKS_FILE", global = true)]
    pub jwks_file: Option<PathBuf>,
    /// The exact `iss` tokens must carry. Default with hs256: `orderflow`; required with rs256/es256.
    #[arg(long, env = "ORDERFLOW_JWT_ISSUER", global = true)]
    pub jwt_issuer: Option<String>,
    /// Accepted audiences (comma-separated or repeated): the token's `aud` must hold one, or, when it
    /// has no `aud`, its `client_id` (Cognito access tokens). Default with hs256: `orderflow`;
    /// required with rs256/es256.
    #[arg(long, env = "ORDERFLOW_JWT_AUDIENCE", global = true, value_delimiter = ',')]
    pub jwt_audience: Vec<String>,
    /// Clock skew tolerated on `exp` and `nbf` (e.g. 30s, 0s).
    #[arg(long, env = "ORDERFLOW_JWT_LEEWAY", global = true, default_value = "30s", value_parser = parse_leeway)]
    pub jwt_leeway: Duration,
    /// Claims holding the roles (comma-separated): top-level names, or dotted paths such as
    /// `realm_access.roles` (Keycloak). `admin` is the operator role.
    #[arg(
        long,
        env = "ORDERFLOW_JWT_ROLES_CLAIM",
        global = true,
        value_delimiter = ',',
        default_value = "roles,cognito:groups"
    )]
    pub jwt_roles_claim: Vec<String>,
    /// The claim naming the principal (a customer id for customers); `sub` itself is still required.
    #[arg(long, env = "ORDERFLOW_JWT_SUBJECT_CLAIM", global = true, default_value = "sub")]
    pub jwt_subject_claim: String,
    /// Reload the key set in the background once it is this old.
    #[arg(long, env = "ORDERFLOW_JWKS_REFRESH", global = true, default_value = "1h", value_parser = parse_duration)]
    pub jwks_refresh: Duration,
    /// Least time between two loads of the key set (a token naming an unknown `kid` triggers one).
    #[arg(long, env = "ORDERFLOW_JWKS_MIN_REFRESH", global = true, default_value = "30s", value_parser = parse_leeway)]
    pub jwks_min_refresh: Duration,
    /// Longest time one fetch of `--jwks-url` may take.
    #[arg(long, env = "ORDERFLOW_JWKS_TIMEOUT", global = true, default_value = "5s", value_parser = parse_duration)]
    pub jwks_timeout: Duration,
}

impl AuthArgs {
    /// The authenticator these settings describe, or a message naming the flags to fix. Only the
    /// HS256 mode reads (or generates) the shared secret.
    pub fn authenticator(&self, global: &GlobalArgs) -> anyhow::Result<Authenticator> {
        let mut rules = ClaimRules::new(String::new(), Vec::<String>::new());
        rules.leeway = self.jwt_leeway;
        rules.roles_claims = self.jwt_roles_claim.iter().map(|c| c.trim().to_string()).collect();
        rules.roles_claims.retain(|c| !c.is_empty());
        rules.subject_claim = self.jwt_subject_claim.trim().to_string();
        if rules.subject_claim.is_empty() {
            bail!("--jwt-subject-claim (ORDERFLOW_JWT_SUBJECT_CLAIM) must name a claim");
        }
        let audiences: Vec<String> = self.jwt_audience.iter().map(|a| a.trim().to_string()).collect();
        if audiences.iter().any(String::is_empty) {
            bail!("--jwt-audience (ORDERFLOW_JWT_AUDIENCE) has an empty entry");
        }
        if self
            .jwt_issuer
            .as_deref()
            .is_some_and(|issuer| issuer.trim().is_empty())
        {
            bail!("--jwt-issuer (ORDERFLOW_JWT_ISSUER) is empty");
        }
        let source = match (&self.jwks_url, &self.jwks_file) {
            (Some(_), Some(_)) => bail!("give --jwks-url or --jwks-file, not both"),
            (Some(url), None) => Some(JwksSource::Url(parse_jwks_url(url)?)),
            (None, Some(path)) => Some(JwksSource::File(path.clone())),
            (None, None) => None,
        };

        if self.jwt_algorithm == JwtAlgorithm::Hs256 {
            if source.is_some() {
                bail!(
                    "--jwks-url/--jwks-file hold an identity provider's keys: use them with \
                     --jwt-algorithm rs256 or es256 (ORDERFLOW_JWT_ALGORITHM)"
                );
            }
            rules.issuer = self.jwt_issuer.clone().unwrap_or_else(|| DEV_ISSUER.into());
            rules.audiences = if audiences.is_empty() {
                vec![DEV_AUDIENCE.into()]
            } else {
                audiences
            };
            return Ok(Authenticator::with_secret(&global.jwt_secret()?, rules));
        }

        let algorithm = format!("{:?}", self.jwt_algorithm).to_lowercase();
        let Some(source) = source else {
            bail!(
                "--jwt-algorithm {algorithm} needs the identity provider's keys: --jwks-url \
                 (ORDERFLOW_JWKS_URL) or --jwks-file (ORDERFLOW_JWKS_FILE)"
            );
        };
        let Some(issuer) = self.jwt_issuer.clone() else {
            bail!("--jwt-algorithm {algorithm} needs --jwt-issuer (ORDERFLOW_JWT_ISSUER): the provider's exact `iss`");
        };
        if audiences.is_empty() {
            bail!(
                "--jwt-algorithm {algorithm} needs --jwt-audience (ORDERFLOW_JWT_AUDIENCE): this API's \
                 identifier or the app client id"
            );
        }
        if global.jwt_secret.is_some() {
            bail!(
                "--jwt-secret (ORDERFLOW_JWT_SECRET) is for --jwt-algorithm hs256; with {algorithm} \
                 tokens are verified with the identity provider's keys only — remove the secret"
            );
        }
        rules.issuer = issuer;
        rules.audiences = audiences;
        let jwks = JwksSettings {
            source,
            refresh: self.jwks_refresh,
            min_refresh: self.jwks_min_refresh,
            timeout: self.jwks_timeout,
        };
        Authenticator::with_jwks(self.jwt_algorithm, jwks, rules)
    }

    /// The authenticator of `orderflow token`, which mints HS256 development tokens only.
    pub fn token_issuer(&self, global: &GlobalArgs) -> anyhow::Result<Authenticator> {
        if self.jwt_algorithm != JwtAlgorithm::Hs256 {
            bail!(
                "`orderflow token` mints HS256 development tokens; with --jwt-algorithm rs256/es256 tokens \
                 come from the identity provider"
            );
        }
        self.authenticator(global)
    }
}

fn parse_jwks_url(text: &str) -> anyhow::Result<reqwest::Url> {
    let url = reqwest::Url::parse(text.trim()).with_context(|| format!("--jwks-url `{text}` is not a URL"))?;
    if !matches!(url.scheme(), "https" | "http") {
        bail!("--jwks-url must be an https:// (or http://) URL");
    }
    Ok(url)
}

/// A duration that may be zero (`0s`, `0`), e.g. no leeway.
fn parse_leeway(text: &str) -> Result<Duration, String> {
    if text.trim().trim_end_matches(['s', 'm', 'h']) == "0" {
        return Ok(Duration::ZERO);
    }
    parse_duration(text)
}

#[cfg(test)]
mod tests {
    use clap::Parser;

    use super::super::Cli;

    fn build(args: &[&str]) -> anyhow::Result<crate::http::Authenticator> {
        let mut all = vec!["orderflow", "--data-dir", "/nonexistent-orderflow-test"];
        all.extend_from_slice(args);
        let cli = Cli::try_parse_from(all).expect("parses");
        cli.serve.auth.authenticator(&cli.global)
    }

    fn refusal(args: &[&str]) -> String {
        format!("{:#}", build(args).err().expect("refused"))
    }

    #[test]
    fn identity_provider_modes_need_keys_issuer_and_audience() {
        let secret = ["--jwt-secret", "0123456789abcdef0123456789abcdef"];
        assert!(build(&secret).is_ok());
        let idp = ["--jwt-issuer", "https://idp.example", "--jwt-audience", "api"];

        let error = refusal(&[&["--jwt-algorithm", "rs256"][..], &idp].concat());
        assert!(error.contains("--jwks-url"), "{error}");
        let error = refusal(&[
            "--jwt-algorithm",
            "es256",
            "--jwks-url",
            "https://idp.example/jwks.json",
        ]);
        assert!(error.contains("--jwt-issuer"), "{error}");
        let error = refusal(&[
            "--jwt-algorithm",
            "rs256",
            "--jwks-url",
            "https://idp.example/jwks.json",
            "--jwt-issuer",
            "https://idp.example",
        ]);
        assert!(error.contains("--jwt-audience"), "{error}");
        let error = refusal(&["--jwks-url", "https://idp.example/jwks.json"]);
        assert!(error.contains("rs256"), "{error}");
        let error = refusal(&[&["--jwt-algorithm", "rs256", "--jwks-url", "ftp://x/y"][..], &idp].concat());
        assert!(error.contains("https://"), "{error}");
        let both = [
            "--jwt-algorithm",
            "rs256",
            "--jwks-url",
            "https://x/y",
            "--jwks-file",
            "/k.json",
        ];
        assert!(refusal(&[&both[..], &idp].concat()).contains("not both"));
        let with_secret = ["--jwt-algorithm", "rs256", "--jwks-url", "https://x/y"];
        assert!(refusal(&[&with_secret[..], &idp, &secret].concat()).contains("--jwt-secret"));

        let rs256 = build(
            &[
                &[
                    "--jwt-algorithm",
                    "rs256",
                    "--jwks-url",
                    "https://idp.example/jwks.json",
                ][..],
                &idp,
            ]
            .concat(),
        )
        .unwrap();
        assert_eq!(rs256.algorithm(), crate::http::auth::JwtAlgorithm::Rs256);
        assert!(rs256.key_source().is_some());
    }

    #[test]
    fn durations_and_lists_parse() {
        let cli = Cli::try_parse_from([
            "orderflow",
            "--jwt-leeway",
            "0s",
            "--jwks-min-refresh",
            "0",
            "--jwt-audience",
            "a,b",
            "--jwt-roles-claim",
            "realm_access.roles",
        ])
        .unwrap();
        assert_eq!(cli.serve.auth.jwt_leeway, std::time::Duration::ZERO);
        assert_eq!(cli.serve.auth.jwks_min_refresh, std::time::Duration::ZERO);
        assert_eq!(cli.serve.auth.jwt_audience, ["a", "b"]);
        assert_eq!(cli.serve.auth.jwt_roles_claim, ["realm_access.roles"]);
        assert!(Cli::try_parse_from(["orderflow", "--jwt-algorithm", "none"]).is_err());
    }
}
