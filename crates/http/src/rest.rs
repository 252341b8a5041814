//! REST endpoints for topics: publish, fetch, delete, info and list.

use axum::body::Body;
use axum::extract::{RawQuery, State};
use axum::http::{header, HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::Extension;
use herald_auth::Action;
use herald_core::{Door, Kind, NewMessage};
use herald_protocol::encode::{push_fetched, push_json_str};
use herald_protocol::ErrorCode;
use std::fmt::Write;

use crate::auth::Caller;
use crate::extract::TopicPath;
use crate::limits::{self, PeerOf};
use crate::{ApiError, AppState};

/// Query parameters as name/value pairs, with precise errors for malformed ones.
pub(crate) struct Query(Vec<(String, String)>);

impl Query {
    pub(crate) fn parse(raw: Option<&str>) -> Result<Self, ApiError> {
        serde_urlencoded::from_str(raw.unwrap_or_default())
            .map(Query)
            .map_err(|e| ApiError::bad_request(format!("malformed query string: {e}")))
    }

    pub(crate) fn get(&self, name: &str) -> Option<&str> {
        self.0.iter().rev().find(|(k, _)| k == name).map(|(_, v)| v.as_str())
    }

    /// An integer parameter within `min..=max`, or `default` when absent.
    pub(crate) fn number(&self, name: &str, min: u64, max: u64, default: u64) -> Result<u64, ApiError> {
        let Some(v) = self.get(name) else {
            return Ok(default);
        };
        match v.parse::<u64>() {
            Ok(n) if (min..=max).contains(&n) => Ok(n),
            _ => Err(ApiError::bad_request(format!("{name} must be an integer from {min} to {max}"))),
        }
    }
}

fn json(status: StatusCode, body: String) -> Response {
    (status, [(header::CONTENT_TYPE, "application/json")], body).into_response()
}

/// The kind a Content-Type selects (the kind table of docs/protocol.md); media types compare
/// case-insensitively and parameters are ignored.
fn kind_of(headers: &HeaderMap) -> Kind {
    match headers.get(header::CONTENT_TYPE).and_then(|v| v.to_str().ok()) {
        Some(content_type) => herald_protocol::kind_of_media_type(content_type),
        None => Kind::Binary,
    }
}

/// The message a publish or enqueue request carries: its body (at most
/// `max_message_bytes`), of the kind its `Content-Type` says, checked against it.
pub(crate) async fn read_message(
    state: &AppState,
    headers: &HeaderMap,
    body: Body,
    ttl_ms: Option<u64>,
) -> Result<NewMessage, ApiError> {
    let max = state.broker().config().max_message_bytes;
    let payload = axum::body::to_bytes(body, max).await.map_err(|e| body_error(e, max))?;
    let kind = kind_of(headers);
    herald_protocol::check_payload(kind, &payload).map_err(|e| ApiError::bad_request(e.to_string()))?;
    Ok(NewMessage { kind, payload, ttl_ms })
}

/// A body that could not be read: over the limit (`too_large`) or broken off.
pub(crate) fn body_error(e: axum::Error, max: usize) -> ApiError {
    let mut source: Option<&(dyn std::error::Error + 'static)> = Some(&e);
    while let Some(err) = source {
        if err.is::<http_body_util::LengthLimitError>() {
            return ApiError::new(ErrorCode::TooLarge, format!("body is over the limit of {max} bytes"));
        }
        source = err.source();
    }
    ApiError::bad_request(format!("could not read the body: {e}"))
}

pub(crate) async fn publish(
    State(state): State<AppState>,
    Extension(caller): Extension<Caller>,
    peer: PeerOf,
    TopicPath(topic): TopicPath,
    RawQuery(query): RawQuery,
    headers: HeaderMap,
    body: Body,
) -> Result<Response, ApiError> {
    caller.permit(Action::Publish, topic.as_str())?;
    let query = Query::parse(query.as_deref())?;
    let ttl_ms = query.get("ttl_ms").is_some().then(|| query.number("ttl_ms", 0, u64::MAX, 0)).transpose()?;
    let msg = read_message(&state, &headers, body, ttl_ms).await?;
    limits::admit(&peer, &caller, 1, msg.payload.len())?;
    let published = state.broker().publish_via(Door::Http, &topic, msg).await?;
    let mut body = String::from("{\"topic\":");
    push_json_str(&mut body, topic.as_str());
    let _ = write!(body, ",\"offset\":{},\"ts\":{}}}", published.offset, published.ts);
    Ok(json(StatusCode::CREATED, body))
}

pub(crate) async fn fetch(
    State(state): State<AppState>,
    Extension(caller): Extension<Caller>,
    TopicPath(topic): TopicPath,
    RawQuery(query): RawQuery,
) -> Result<Response, ApiError> {
    caller.permit(Action::Subscribe, topic.as_str())?;
    let query = Query::parse(query.as_deref())?;
    let from = query.number("from", 0, u64::MAX, 0)?;
    let limit = query.number("limit", 1, 1000, 100)?;
    let page = state.broker().fetch(&topic, from, limit as usize).await?;
    let mut body = String::with_capacity(64 + page.messages.iter().map(|m| m.size_hint()).sum::<usize>());
    body.push_str("{\"topic\":");
    push_json_str(&mut body, topic.as_str());
    body.push_str(",\"epoch\":");
    push_json_str(&mut body, &page.epoch);
    body.push_str(",\"messages\":[");
    for (i, msg) in page.messages.iter().enumerate() {
        if i > 0 {
            body.push(',');
        }
        push_fetched(&mut body, msg);
    }
    let _ = write!(body, "],\"next\":{}}}", page.next);
    Ok(json(StatusCode::OK, body))
}

pub(crate) async fn delete_topic(
    State(state): State<AppState>,
    Extension(caller): Extension<Caller>,
    TopicPath(topic): TopicPath,
) -> Result<StatusCode, ApiError> {
    caller.permit(Action::Admin, topic.as_str())?;
    state.broker().delete(&topic).await?;
    Ok(StatusCode::NO_CONTENT)
}

pub(crate) async fn topic_info(
    State(state): State<AppState>,
    Extension(caller): Extension<Caller>,
    TopicPath(topic): TopicPath,
) -> Result<Response, ApiError> {
    caller.permit(Action::Subscribe, topic.as_str())?;
    let info = state.broker().info(&topic).await?;
    let h = &info.head;
    let mut body = String::from("{\"topic\":");
    push_json_str(&mut body, topic.as_str());
    body.push_str(",\"epoch\":");
    push_json_str(&mut body, &h.epoch);
    let _ = write!(
        body,
        ",\"first\":{},\"last\":{},\"retained\":{},\"subscribers\":{},\"publishers\":{}}}",
        h.first, h.last, h.retained, info.subscribers, info.publishers
    );
    Ok(json(StatusCode::OK, body))
}

/// `GET /v1/topics/{topic}/presence`: the topic's members on this node, by connection,
/// paged with `after` (a connection id) and `limit`.
pub(crate) async fn presence(
    State(state): State<AppState>,
    Extension(caller): Extension<Caller>,
    TopicPath(topic): TopicPath,
    RawQuery(query): RawQuery,
) -> Result<Response, ApiError> {
    caller.permit(Action::Subscribe, topic.as_str())?;
    let query = Query::parse(query.as_deref())?;
    let limit = query.number("limit", 1, 1000, 100)?;
    let after = query.number("after", 0, u64::MAX, 0)?;
    let list = state.broker().presence().list(&topic, after, limit as usize);
    let mut body = String::from("{\"topic\":");
    push_json_str(&mut body, topic.as_str());
    body.push(',');
    herald_protocol::encode::push_presence_list(&mut body, &list);
    match list.members.last().filter(|_| list.more) {
        Some(last) => {
            let _ = write!(body, ",\"next\":{}}}", last.conn.id);
        }
        None => body.push_str(",\"next\":null}"),
    }
    Ok(json(StatusCode::OK, body))
}

/// Lists the topics the caller may administer (all of them without auth).
pub(crate) async fn list_topics(
    State(state): State<AppState>,
    Extension(caller): Extension<Caller>,
    RawQuery(query): RawQuery,
) -> Result<Response, ApiError> {
    let query = Query::parse(query.as_deref())?;
    let limit = query.number("limit", 1, 1000, 100)?;
    let prefix = query.get("prefix").unwrap_or_default();
    let limit = limit as usize;
    // Filled from the names the caller may administer: a page the filter emptied is read
    // past, so that only the end of the list gives a short page (or an empty one).
    let visible = |t: &herald_core::TopicName| caller.allows(Action::Admin, t.as_str());
    let topics = state.broker().list_visible(prefix, query.get("after"), limit, visible).await?;
    let mut body = String::from("{\"topics\":[");
    for (i, t) in topics.iter().enumerate() {
        if i > 0 {
            body.push(',');
        }
        body.push_str("{\"topic\":");
        push_json_str(&mut body, t.topic.as_str());
        let _ =
            write!(body, ",\"last\":{},\"subscribers\":{},\"publishers\":{}}}", t.last, t.subscribers, t.publishers);
    }
    body.push_str("]}");
    Ok(json(StatusCode::OK, body))
}

#[cfg(test)]
mod fuzz {
    //! Fuzz harness (proptest, stable Rust) for query strings, which every client
    //! controls: any string parses or is refused as `bad_request`; any parameter value
    //! is a number in range or a `bad_request`; never a panic.
    use super::Query;
    use herald_protocol::ErrorCode;
    use proptest::prelude::*;

    const SEEDS: &[&str] =
        &["", "&", "=", "a=%", "a=%zz", "from=-1", "from=99999999999999999999", "a=1&a=2", "%00=%00"];

    fn check(raw: &str) -> Result<(), TestCaseError> {
        match Query::parse(Some(raw)) {
            Ok(q) => {
                for name in ["from", "limit", "max", "wait_ms"] {
                    if let Err(e) = q.number(name, 1, 1000, 1) {
                        prop_assert_eq!(e.code, ErrorCode::BadRequest);
                    }
                }
            }
            Err(e) => prop_assert_eq!(e.code, ErrorCode::BadRequest),
        }
        Ok(())
    }

    #[test]
    fn the_seed_corpus_parses_or_is_refused() {
        for seed in SEEDS {
            if let Err(e) = check(seed) {
                panic!("{seed:?}: {e}");
            }
        }
    }

    proptest! {
        #[test]
        fn any_query_string_parses_or_is_refused(raw in ".{0,120}") {
            check(&raw)?;
        }

        #[test]
        fn any_query_shaped_string_parses_or_is_refused(raw in "([a-z_]{1,8}=[0-9a-z%+-]{0,24}&?){0,6}") {
            check(&raw)?;
        }
    }
}
