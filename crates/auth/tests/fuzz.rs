//! Fuzz harness (proptest, stable Rust) for what a client controls in authentication:
//! `Authorization` header values, bearer tokens (JWT parsing and checking) and, from the
//! operator, grant patterns. Whatever the input: no panic, and a token that was not
//! signed with the configured key is never accepted. Seeds are replayed on every run.

use std::sync::Arc;

use base64::Engine;
use herald_auth::{AuthConfig, Authenticator, Credentials, JwtConfig, Pattern, SecretSource};
use proptest::prelude::*;

const SECRET: &str = "the fuzzing secret, at least thirty-two bytes";

fn authenticator() -> Arc<Authenticator> {
    std::env::set_var("HERALD_FUZZ_SECRET", SECRET);
    let jwt = JwtConfig {
        algorithm: "HS256".into(),
        secret: Some(SecretSource { file: None, env: Some("HERALD_FUZZ_SECRET".into()) }),
        ..Default::default()
    };
    match Authenticator::new(&AuthConfig { users: Vec::new(), jwt: Some(jwt), ..Default::default() }) {
        Ok(a) => Arc::new(a),
        Err(e) => panic!("{e}"),
    }
}

fn b64(bytes: &[u8]) -> String {
    base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(bytes)
}

const SEEDS: &[&str] = &[
    "",
    ".",
    "..",
    "a.b.c",
    "eyJhbGciOiJub25lIn0.eyJzdWIiOiJ4IiwiZXhwIjo5OTk5OTk5OTk5fQ.",
    "eyJhbGciOiJIUzI1NiJ9.bm90IGpzb24.c2ln",
    "eyJhbGciOiJIUzI1NiJ9.eyJleHAiOiJzb29uIn0.AAAA",
    "%%%.%%%.%%%",
];

proptest! {
    #[test]
    fn any_header_parses_or_is_none(value in ".{0,120}") {
        let _ = Credentials::from_header(&value);
        let _ = Credentials::from_header(&format!("Basic {value}"));
        let _ = Credentials::from_header(&format!("Bearer {value}"));
    }

    #[test]
    fn any_pattern_parses_or_is_refused_and_matching_never_panics(
        pattern in "[a-z*>{}.]{0,24}",
        user in "[a-z.]{0,8}",
        name in "[a-z.]{0,24}",
    ) {
        if let Ok(p) = Pattern::parse(&pattern) {
            let _ = p.matches(&user, &name);
        }
    }

    #[test]
    fn no_forged_token_is_accepted(
        header in prop::collection::vec(any::<u8>(), 0..64),
        payload in prop::collection::vec(any::<u8>(), 0..128),
        signature in prop::collection::vec(any::<u8>(), 0..64),
        json_header in prop_oneof![
            Just(r#"{"alg":"HS256","typ":"JWT"}"#.to_owned()),
            Just(r#"{"alg":"none"}"#.to_owned()),
            Just(r#"{"alg":"HS512"}"#.to_owned()),
            Just(r#"{"alg":"RS256","kid":"x"}"#.to_owned()),
        ],
        exp in any::<u64>(),
    ) {
        let auth = authenticator();
        let raw = format!("{}.{}.{}", b64(&header), b64(&payload), b64(&signature));
        prop_assert!(auth.authenticate(&Credentials::Bearer(raw)).is_err());
        let claims = format!(r#"{{"sub":"mallory","exp":{exp},"herald":{{"publish":[">"]}}}}"#);
        let forged = format!("{}.{}.{}", b64(json_header.as_bytes()), b64(claims.as_bytes()), b64(&signature));
        prop_assert!(auth.authenticate(&Credentials::Bearer(forged)).is_err());
    }
}

#[test]
fn the_seed_corpus_is_refused() {
    let auth = authenticator();
    for seed in SEEDS {
        assert!(auth.authenticate(&Credentials::Bearer((*seed).to_owned())).is_err(), "{seed:?}");
        let _ = Credentials::from_header(seed);
        let _ = Pattern::parse(seed);
    }
}
