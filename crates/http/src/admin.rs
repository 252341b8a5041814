//! The admin API over HTTP: `GET /v1/admin/connections` lists this node's long-lived
//! connections (door, address, user, subscriptions, queued bytes), and
//! `DELETE /v1/admin/connections/{id}` closes one. Both need the `admin` right on `>`
//! (every name). Queue purge and redrive live with the queue routes (queues.rs).

use std::fmt::Write;

use axum::extract::{Path, RawQuery, State};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::Extension;
use herald_auth::Action;
use herald_protocol::encode::push_json_str;
use herald_protocol::ErrorCode;

use crate::auth::Caller;
use crate::rest::Query;
use crate::{ApiError, AppState};

/// The name connection admin is checked against: only a grant covering every name
/// (`>`, or `*`) allows it.
pub(crate) const ALL_NAMES: &str = ">";

/// Most connections one page lists.
const MAX_PAGE: u64 = 1000;

/// `GET /v1/admin/connections[?after=ID&limit=100]`: a page of connections by id.
pub(crate) async fn connections(
    State(state): State<AppState>,
    Extension(caller): Extension<Caller>,
    RawQuery(query): RawQuery,
) -> Result<Response, ApiError> {
    caller.permit(Action::Admin, ALL_NAMES)?;
    let query = Query::parse(query.as_deref())?;
    let after = query.number("after", 0, u64::MAX, 0)?;
    let limit = query.number("limit", 1, MAX_PAGE, 100)? as usize;
    let page = state.broker().connection_page(after, limit + 1);
    let more = page.len() > limit;
    let mut body = String::from("{\"connections\":[");
    for (i, (c, topics)) in page.iter().take(limit).enumerate() {
        if i > 0 {
            body.push(',');
        }
        let _ = write!(body, "{{\"id\":{},\"door\":\"{}\",\"peer\":", c.id, c.door.label());
        match c.peer() {
            Some(peer) => push_json_str(&mut body, &peer.to_string()),
            None => body.push_str("null"),
        }
        body.push_str(",\"user\":");
        match c.user() {
            Some(user) => push_json_str(&mut body, user),
            None => body.push_str("null"),
        }
        body.push_str(",\"subscriptions\":[");
        for (j, topic) in topics.iter().enumerate() {
            if j > 0 {
                body.push(',');
            }
            push_json_str(&mut body, topic.as_str());
        }
        let _ = write!(body, "],\"queued_bytes\":{},\"since\":{}}}", c.queued_bytes(), c.since_ms);
    }
    let _ = write!(body, "],\"open\":{},\"next\":", state.broker().connections().len());
    match (more, page.get(limit.saturating_sub(1))) {
        (true, Some((last, _))) => {
            let _ = write!(body, "{}", last.id);
        }
        _ => body.push_str("null"),
    }
    body.push('}');
    Ok((StatusCode::OK, [(axum::http::header::CONTENT_TYPE, "application/json")], body).into_response())
}

/// `DELETE /v1/admin/connections/{id}`: 204 once its close is queued, 404 if no such
/// connection is open.
pub(crate) async fn close_connection(
    State(state): State<AppState>,
    Extension(caller): Extension<Caller>,
    Path(id): Path<String>,
) -> Result<Response, ApiError> {
    caller.permit(Action::Admin, ALL_NAMES)?;
    let id: u64 = id.parse().map_err(|_| ApiError::bad_request(format!("{id:?} is not a connection id")))?;
    if state.broker().connections().close(id) {
        Ok(StatusCode::NO_CONTENT.into_response())
    } else {
        Err(ApiError::new(ErrorCode::NotFound, format!("no open connection {id}")))
    }
}
