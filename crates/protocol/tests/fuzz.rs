//! Fuzz harness (proptest, stable Rust) for the JSON protocol's frame decoder, the input
//! every WebSocket client controls: whatever the text, `parse_client_frame` returns a
//! frame or a precise error (`bad_request` or `invalid_name`), never panics. The seeds
//! below are replayed on every run (the committed corpus); the generated cases run
//! `PROPTEST_CASES` times (256 by default; docs/security.md has the longer run).

use herald_core::Kind;
use herald_protocol::decode::parse_from_query;
use herald_protocol::{check_payload, is_delivery_id, kind_of_media_type, parse_client_frame, ErrorCode};
use proptest::prelude::*;

/// Inputs that once were, or could be, trouble.
const SEEDS: &[&str] = &[
    "",
    "{",
    "[]",
    "null",
    "{}",
    r#"{"op":null}"#,
    r#"{"op":"subscribe"}"#,
    r#"{"op":"subscribe","topic":""}"#,
    r#"{"op":"subscribe","topic":"a..b"}"#,
    r#"{"op":"subscribe","topic":"a","from":-1}"#,
    r#"{"op":"subscribe","topic":"a","from":18446744073709551616}"#,
    r#"{"op":"subscribe","topic":"a","from":1e300}"#,
    r#"{"op":"publish","topic":"a"}"#,
    r#"{"op":"publish","topic":"a","data":1,"data_b64":"AA=="}"#,
    r#"{"op":"publish","topic":"a","data_b64":"%%%"}"#,
    r#"{"op":"publish","topic":"a","data":{"deep":[[[[[[[[[[[[[[[[]]]]]]]]]]]]]]]]},"ttl_ms":-5}"#,
    r#"{"op":"auth","token":""}"#,
    r#"{"op":"auth","token":{"a":1}}"#,
    r#"{"op":"ping","id":9007199254740993}"#,
    r#"{"op":"ping","id":"7"}"#,
    "{\"op\":\"subscribe\",\"topic\":\"\u{0}\"}",
    "{\"op\":\"subscribe\",\"topic\":\"\u{202e}rtl\"}",
    r#"{"op":"subscribe","topic":"a","topic":"b"}"#,
];

fn check(text: &str) -> Result<(), TestCaseError> {
    if let Err(e) = parse_client_frame(text) {
        prop_assert!(matches!(e.code, ErrorCode::BadRequest | ErrorCode::InvalidName), "{text:?} gave {:?}", e.code);
        prop_assert!(!e.message.is_empty());
    }
    Ok(())
}

/// JSON-looking frames: an object of known and unknown fields with arbitrary values.
fn frame() -> impl Strategy<Value = String> {
    let value = prop_oneof![
        Just("null".to_owned()),
        any::<i64>().prop_map(|n| n.to_string()),
        any::<u64>().prop_map(|n| n.to_string()),
        any::<f64>().prop_map(|f| format!("{f:?}")),
        ".{0,40}".prop_map(|s| serde_json::to_string(&s).unwrap_or_default()),
        "[a-z.*>]{0,12}".prop_map(|s| format!("\"{s}\"")),
        Just("{\"x\":[1,2,{}]}".to_owned()),
        Just("[]".to_owned()),
    ];
    let key = prop_oneof![
        Just("op"),
        Just("id"),
        Just("topic"),
        Just("from"),
        Just("epoch"),
        Just("data"),
        Just("data_b64"),
        Just("ttl_ms"),
        Just("token"),
        Just("other"),
    ];
    let op =
        prop_oneof![Just("subscribe"), Just("unsubscribe"), Just("publish"), Just("ping"), Just("auth"), Just("x")];
    (op, prop::collection::vec((key, value), 0..8)).prop_map(|(op, fields)| {
        let mut text = format!("{{\"op\":\"{op}\"");
        for (k, v) in fields {
            text.push_str(&format!(",\"{k}\":{v}"));
        }
        text.push('}');
        text
    })
}

#[test]
fn the_seed_corpus_decodes_or_is_refused_precisely() {
    for seed in SEEDS {
        if let Err(e) = check(seed) {
            panic!("{e}");
        }
        let _ = parse_from_query(seed);
    }
}

proptest! {
    #[test]
    fn any_text_decodes_or_is_refused_precisely(text in ".{0,200}") {
        check(&text)?;
    }

    #[test]
    fn any_frame_shape_decodes_or_is_refused_precisely(text in frame()) {
        check(&text)?;
    }

    #[test]
    fn any_from_query_value_parses_or_is_none(text in ".{0,40}") {
        let _ = parse_from_query(&text);
    }

    #[test]
    fn any_delivery_id_is_judged(text in ".{0,80}") {
        let _ = is_delivery_id(&text);
    }

    /// REST and gRPC bodies: any bytes under any kind, any Content-Type.
    #[test]
    fn any_body_is_checked_against_any_kind(body in prop::collection::vec(any::<u8>(), 0..256), content_type in ".{0,60}") {
        for kind in [Kind::Json, Kind::Text, Kind::Binary] {
            let checked = check_payload(kind, &body);
            if kind == Kind::Binary {
                prop_assert!(checked.is_ok());
            }
        }
        let _ = kind_of_media_type(&content_type);
    }
}
