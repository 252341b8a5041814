//! JWT bearer tokens: the algorithm is pinned by the configuration (a token naming
//! another is refused, whatever its signature), `exp` is required, `iss` and `aud` are
//! checked when configured, and the caller's rights come from one claim (`herald` by
//! default) shaped like a user's grants:
//! `{"sub": "alice", "exp": 1767225600, "herald": {"publish": ["chat.>"], "subscribe": [">"]}}`.
//!
//! Keys: an HMAC secret (from a file or an environment variable; a previous secret
//! still accepted until a date, for rotation), or public keys: one PEM file, or a JWKS
//! file whose keys are chosen by the token's `kid`.

use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::Arc;

use jsonwebtoken::jwk::JwkSet;
use jsonwebtoken::{Algorithm, DecodingKey, Validation};
use serde::Deserialize;

use crate::{GrantsSpec, Principal, SecretSource};

/// The `[auth.jwt]` section.
#[derive(Debug, Clone, Default, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct JwtConfig {
    /// The one algorithm accepted: HS256, HS384, HS512, RS256, RS384, RS512, PS256,
    /// PS384, PS512, ES256, ES384 or EdDSA.
    pub algorithm: String,
    /// The HMAC secret (HS*).
    pub secret: Option<SecretSource>,
    /// A previous HMAC secret, still accepted until `previous_until`.
    pub previous_secret: Option<SecretSource>,
    /// Until when the previous secret is accepted (`2026-12-31T00:00:00Z`).
    pub previous_until: Option<String>,
    /// The public key, PEM (RS*, PS*, ES*, EdDSA).
    pub public_key_file: Option<PathBuf>,
    /// Public keys as a JWKS file, chosen by the token's `kid`.
    pub jwks_file: Option<PathBuf>,
    /// The required `iss`, if any.
    pub issuer: Option<String>,
    /// The required `aud`, if any.
    pub audience: Option<String>,
    /// The claim holding the caller's grants (default `herald`).
    pub claim: Option<String>,
    /// Clock skew tolerated on `exp` and `nbf`, seconds (default 30).
    pub leeway_secs: Option<u64>,
}

/// Why the JWT settings or a token are refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum JwtError {
    /// The settings are wrong.
    #[error("{0}")]
    Config(String),
    /// The token is refused.
    #[error("{0}")]
    Token(String),
}

enum Keys {
    /// HMAC: the current secret, and a previous one with its last second.
    Hmac(DecodingKey, Option<(DecodingKey, u64)>),
    /// One public key.
    Public(DecodingKey),
    /// Public keys by `kid`.
    Set(HashMap<String, DecodingKey>),
}

pub(crate) struct Jwt {
    keys: Keys,
    validation: Validation,
    claim: String,
}

fn algorithm(name: &str) -> Result<Algorithm, JwtError> {
    Ok(match name {
        "HS256" => Algorithm::HS256,
        "HS384" => Algorithm::HS384,
        "HS512" => Algorithm::HS512,
        "RS256" => Algorithm::RS256,
        "RS384" => Algorithm::RS384,
        "RS512" => Algorithm::RS512,
        "PS256" => Algorithm::PS256,
        "PS384" => Algorithm::PS384,
        "PS512" => Algorithm::PS512,
        "ES256" => Algorithm::ES256,
        "ES384" => Algorithm::ES384,
        "EdDSA" => Algorithm::EdDSA,
        other => return Err(JwtError::Config(format!("unknown algorithm {other:?}"))),
    })
}

fn read_secret(what: &str, source: &SecretSource) -> Result<Vec<u8>, JwtError> {
    let text = match (&source.file, &source.env) {
        (Some(file), None) => std::fs::read_to_string(file)
            .map_err(|e| JwtError::Config(format!("{what}: reading {}: {e}", file.display())))?,
        (None, Some(var)) => std::env::var(var)
            .map_err(|_| JwtError::Config(format!("{what}: the environment variable {var} is not set")))?,
        _ => return Err(JwtError::Config(format!("{what}: give exactly one of file or env"))),
    };
    let secret = text.trim_end_matches(['\n', '\r']).as_bytes().to_vec();
    if secret.len() < 32 {
        return Err(JwtError::Config(format!("{what}: an HMAC secret must be at least 32 bytes")));
    }
    Ok(secret)
}

/// Seconds since the Unix epoch of `YYYY-MM-DDTHH:MM:SSZ`.
fn parse_utc(s: &str) -> Option<u64> {
    let b = s.as_bytes();
    if b.len() != 20 || b[4] != b'-' || b[7] != b'-' || b[10] != b'T' || b[13] != b':' || b[16] != b':' || b[19] != b'Z'
    {
        return None;
    }
    let n = |r: std::ops::Range<usize>| s.get(r)?.parse::<i64>().ok();
    let (y, m, d, hh, mm, ss) = (n(0..4)?, n(5..7)?, n(8..10)?, n(11..13)?, n(14..16)?, n(17..19)?);
    if !(1..=12).contains(&m) || !(1..=31).contains(&d) || hh > 23 || mm > 59 || ss > 60 {
        return None;
    }
    // Days from the civil date (Howard Hinnant's algorithm).
    let y = if m <= 2 { y - 1 } else { y };
    let era = y.div_euclid(400);
    let yoe = y - era * 400;
    let doy = (153 * ((m + 9) % 12) + 2) / 5 + d - 1;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    let days = era * 146_097 + doe - 719_468;
    u64::try_from(days * 86_400 + hh * 3600 + mm * 60 + ss).ok()
}

#[derive(Deserialize)]
struct Claims {
    sub: Option<String>,
    exp: u64,
    #[serde(flatten)]
    rest: HashMap<String, serde_json::Value>,
}

impl Jwt {
    pub(crate) fn new(config: &JwtConfig) -> Result<Self, JwtError> {
        let alg = algorithm(&config.algorithm)?;
        let hmac = matches!(alg, Algorithm::HS256 | Algorithm::HS384 | Algorithm::HS512);
        let keys = if hmac {
            if config.public_key_file.is_some() || config.jwks_file.is_some() {
                return Err(JwtError::Config("an HS* algorithm takes a secret, not public keys".into()));
            }
            let secret = config.secret.as_ref().ok_or_else(|| JwtError::Config("secret is missing".into()))?;
            let current = DecodingKey::from_secret(&read_secret("secret", secret)?);
            let previous = match (&config.previous_secret, &config.previous_until) {
                (Some(source), Some(until)) => {
                    let until = parse_utc(until).ok_or_else(|| {
                        JwtError::Config(format!("previous_until {until:?} is not like 2026-12-31T00:00:00Z"))
                    })?;
                    Some((DecodingKey::from_secret(&read_secret("previous_secret", source)?), until))
                }
                (None, None) => None,
                _ => return Err(JwtError::Config("previous_secret and previous_until go together".into())),
            };
            Keys::Hmac(current, previous)
        } else {
            if config.secret.is_some() || config.previous_secret.is_some() {
                return Err(JwtError::Config(format!("{} takes public keys, not a secret", config.algorithm)));
            }
            match (&config.public_key_file, &config.jwks_file) {
                (Some(file), None) => {
                    let pem = std::fs::read(file)
                        .map_err(|e| JwtError::Config(format!("reading {}: {e}", file.display())))?;
                    let key = match alg {
                        Algorithm::ES256 | Algorithm::ES384 => DecodingKey::from_ec_pem(&pem),
                        Algorithm::EdDSA => DecodingKey::from_ed_pem(&pem),
                        _ => DecodingKey::from_rsa_pem(&pem),
                    }
                    .map_err(|e| JwtError::Config(format!("{}: {e}", file.display())))?;
                    Keys::Public(key)
                }
                (None, Some(file)) => {
                    let text = std::fs::read_to_string(file)
                        .map_err(|e| JwtError::Config(format!("reading {}: {e}", file.display())))?;
                    let set: JwkSet = serde_json::from_str(&text)
                        .map_err(|e| JwtError::Config(format!("{}: not a JWKS: {e}", file.display())))?;
                    let mut keys = HashMap::new();
                    for jwk in &set.keys {
                        let kid = jwk.common.key_id.clone().unwrap_or_default();
                        let key = DecodingKey::from_jwk(jwk)
                            .map_err(|e| JwtError::Config(format!("{}: key {kid:?}: {e}", file.display())))?;
                        keys.insert(kid, key);
                    }
                    if keys.is_empty() {
                        return Err(JwtError::Config(format!("{}: no keys", file.display())));
                    }
                    Keys::Set(keys)
                }
                _ => return Err(JwtError::Config("give exactly one of public_key_file or jwks_file".into())),
            }
        };
        let mut validation = Validation::new(alg);
        validation.set_required_spec_claims(&["exp"]);
        validation.leeway = config.leeway_secs.unwrap_or(30);
        validation.validate_nbf = true;
        match &config.audience {
            Some(aud) => validation.set_audience(&[aud]),
            None => validation.validate_aud = false,
        }
        if let Some(iss) = &config.issuer {
            validation.set_issuer(&[iss]);
        }
        let claim = config.claim.clone().unwrap_or_else(|| "herald".to_owned());
        Ok(Self { keys, validation, claim })
    }

    /// Checks `token` at `now` (seconds; for the previous secret's deadline).
    pub(crate) fn check(&self, token: &str, now: u64) -> Result<Principal, JwtError> {
        let bad = |e: jsonwebtoken::errors::Error| JwtError::Token(e.to_string());
        let header = jsonwebtoken::decode_header(token).map_err(bad)?;
        if !self.validation.algorithms.contains(&header.alg) {
            return Err(JwtError::Token(format!("algorithm {:?} is not the one this server accepts", header.alg)));
        }
        let decoded = match &self.keys {
            Keys::Hmac(current, previous) => match jsonwebtoken::decode::<Claims>(token, current, &self.validation) {
                Ok(d) => d,
                Err(e) if matches!(e.kind(), jsonwebtoken::errors::ErrorKind::InvalidSignature) => match previous {
                    Some((key, until)) if now <= *until => {
                        jsonwebtoken::decode::<Claims>(token, key, &self.validation).map_err(bad)?
                    }
                    _ => return Err(bad(e)),
                },
                Err(e) => return Err(bad(e)),
            },
            Keys::Public(key) => jsonwebtoken::decode::<Claims>(token, key, &self.validation).map_err(bad)?,
            Keys::Set(keys) => {
                let kid = header.kid.unwrap_or_default();
                let key = match keys.get(&kid) {
                    Some(k) => k,
                    None if keys.len() == 1 && kid.is_empty() => {
                        keys.values().next().ok_or_else(|| JwtError::Token("no key".into()))?
                    }
                    None => return Err(JwtError::Token(format!("no key with kid {kid:?}"))),
                };
                jsonwebtoken::decode::<Claims>(token, key, &self.validation).map_err(bad)?
            }
        };
        let mut claims = decoded.claims;
        let name = claims.sub.take().filter(|s| !s.is_empty()).ok_or_else(|| JwtError::Token("no sub".into()))?;
        let spec: GrantsSpec = match claims.rest.remove(&self.claim) {
            Some(value) => {
                serde_json::from_value(value).map_err(|e| JwtError::Token(format!("claim {:?}: {e}", self.claim)))?
            }
            None => GrantsSpec::default(),
        };
        let grants = spec.build().map_err(|e| JwtError::Token(e.to_string()))?;
        Ok(Principal { name: Arc::from(name), grants: Arc::new(grants), expires_at: Some(claims.exp) })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::Action;
    use jsonwebtoken::{encode, EncodingKey, Header};

    const SECRET: &str = "a secret of at least thirty-two bytes!!";

    fn config(var: &str) -> JwtConfig {
        std::env::set_var(var, SECRET);
        JwtConfig {
            algorithm: "HS256".into(),
            secret: Some(SecretSource { file: None, env: Some(var.into()) }),
            issuer: Some("https://auth.example".into()),
            audience: Some("herald".into()),
            leeway_secs: Some(0),
            ..Default::default()
        }
    }

    fn token(alg: Algorithm, secret: &str, claims: serde_json::Value) -> String {
        encode(&Header::new(alg), &claims, &EncodingKey::from_secret(secret.as_bytes())).unwrap_or_default()
    }

    #[test]
    fn tokens_are_checked() -> Result<(), JwtError> {
        let jwt = Jwt::new(&config("HERALD_TEST_JWT_SECRET_A"))?;
        let now = crate::now_secs();
        let good = serde_json::json!({"sub": "alice", "exp": now + 600, "iss": "https://auth.example", "aud": "herald",
            "herald": {"publish": ["chat.>"], "deny": {"publish": ["chat.admin"]}}});
        let p = jwt.check(&token(Algorithm::HS256, SECRET, good.clone()), now)?;
        assert_eq!(&*p.name, "alice");
        assert!(p.allows(Action::Publish, "chat.room") && !p.allows(Action::Publish, "chat.admin"));
        assert_eq!(p.expires_at, Some(now + 600));

        let refused = |t: String| jwt.check(&t, now).is_err();
        let mut expired = good.clone();
        expired["exp"] = (now - 10).into();
        assert!(refused(token(Algorithm::HS256, SECRET, expired)), "expired");
        assert!(
            refused(token(Algorithm::HS256, "another secret of thirty-two bytes!!", good.clone())),
            "bad signature"
        );
        assert!(refused(token(Algorithm::HS512, SECRET, good.clone())), "another algorithm");
        let mut aud = good.clone();
        aud["aud"] = "other".into();
        assert!(refused(token(Algorithm::HS256, SECRET, aud)), "wrong audience");
        let mut iss = good.clone();
        iss["iss"] = "https://evil.example".into();
        assert!(refused(token(Algorithm::HS256, SECRET, iss)), "wrong issuer");
        let mut no_exp = good.clone();
        no_exp.as_object_mut().map(|o| o.remove("exp"));
        assert!(refused(token(Algorithm::HS256, SECRET, no_exp)), "no exp");
        // alg "none": a token with an empty signature.
        let none = format!("{}.{}.", b64(r#"{"alg":"none","typ":"JWT"}"#), b64(&good.to_string()));
        assert!(refused(none), "alg none");
        Ok(())
    }

    fn b64(s: &str) -> String {
        use base64::Engine;
        base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(s)
    }

    #[test]
    fn a_previous_secret_is_accepted_until_its_date() -> Result<(), JwtError> {
        let old = "the previous secret of thirty-two bytes";
        std::env::set_var("HERALD_TEST_JWT_OLD", old);
        let mut c = config("HERALD_TEST_JWT_SECRET_B");
        c.previous_secret = Some(SecretSource { file: None, env: Some("HERALD_TEST_JWT_OLD".into()) });
        c.previous_until = Some("2030-01-01T00:00:00Z".into());
        let jwt = Jwt::new(&c)?;
        let now = crate::now_secs();
        let claims = serde_json::json!({"sub": "bob", "exp": now + 60, "iss": "https://auth.example", "aud": "herald"});
        let t = token(Algorithm::HS256, old, claims);
        assert!(jwt.check(&t, now).is_ok(), "before the date");
        assert!(jwt.check(&t, parse_utc("2030-01-01T00:00:01Z").unwrap_or(0)).is_err(), "after it");
        Ok(())
    }

    #[test]
    fn utc_dates_parse() {
        assert_eq!(parse_utc("1970-01-01T00:00:00Z"), Some(0));
        assert_eq!(parse_utc("2026-12-31T00:00:00Z"), Some(1_798_675_200));
        assert_eq!(parse_utc("2000-02-29T12:30:00Z"), Some(951_827_400));
        assert_eq!(parse_utc("2026-13-01T00:00:00Z"), None);
        assert_eq!(parse_utc("2026-12-31"), None);
    }
}
