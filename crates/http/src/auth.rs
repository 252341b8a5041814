//! Authentication and authorization at the HTTP doors (REST, SSE, WebSocket upgrades):
//! a middleware turns the `Authorization` header into a [`Caller`] (or answers 401 with
//! `WWW-Authenticate`), and each handler asks the caller for the action it serves
//! (403 `forbidden` when not granted). With no `[auth]` configured, every caller may do
//! everything, as before.

use std::sync::Arc;

use axum::extract::{Request, State};
use axum::http::{header, HeaderValue};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use herald_auth::{Action, AuthError, Authenticator, Credentials, Ended, Principal, Watch};
use herald_protocol::ErrorCode;

use crate::{ApiError, AppState};

/// Who is calling.
#[derive(Debug, Clone)]
pub(crate) enum Caller {
    /// The server does not authenticate: anyone may do anything.
    Anyone,
    /// A JSON WebSocket opened without credentials: it must send an `auth` frame first.
    Pending,
    /// An authenticated caller.
    User(Arc<Principal>),
}

impl Caller {
    /// `Ok` if the caller may do `action` on `name`, else a 403 `forbidden` (401 before
    /// it authenticated).
    pub(crate) fn permit(&self, action: Action, name: &str) -> Result<(), ApiError> {
        match self {
            Caller::Anyone => Ok(()),
            Caller::User(p) if p.allows(action, name) => Ok(()),
            Caller::User(p) => Err(forbidden(p, action, name)),
            Caller::Pending => Err(ApiError::new(ErrorCode::Unauthorized, "authenticate first")),
        }
    }

    /// Whether the caller may do `action` on `name`.
    pub(crate) fn allows(&self, action: Action, name: &str) -> bool {
        self.permit(action, name).is_ok()
    }
}

/// The 403 for `principal` doing `action` on `name`.
pub(crate) fn forbidden(principal: &Principal, action: Action, name: &str) -> ApiError {
    ApiError::new(ErrorCode::Forbidden, format!("{} may not {action} on {name}", principal.name))
}

/// The watch of a long-lived connection of `caller` doing `actions` on `name`.
pub(crate) fn watch(
    state: &AppState,
    caller: &Caller,
    credentials: Option<Credentials>,
    actions: Vec<Action>,
    name: &str,
) -> Watch {
    let principal = match caller {
        Caller::User(p) => Some(p.clone()),
        Caller::Anyone | Caller::Pending => None,
    };
    Watch::new(state.auth(), principal, credentials, actions, name)
}

/// The WebSocket close for why a watched connection ended.
pub(crate) fn close_for(ended: Ended) -> (u16, &'static str) {
    use herald_protocol::close;
    match ended {
        Ended::Expired => (close::UNAUTHORIZED, "token expired"),
        Ended::Refused => (close::UNAUTHORIZED, "credentials no longer accepted"),
        Ended::Withdrawn => (close::FORBIDDEN, "grant withdrawn"),
    }
}

/// The credentials of a request's `Authorization` header, if it has any.
pub(crate) fn credentials_of(headers: &axum::http::HeaderMap) -> Option<Credentials> {
    headers.get(header::AUTHORIZATION).and_then(|v| v.to_str().ok()).and_then(Credentials::from_header)
}

/// The 401 for `error`, with a challenge for each scheme the server takes.
fn unauthorized(auth: &Authenticator, error: &AuthError) -> Response {
    let mut response = ApiError::new(ErrorCode::Unauthorized, error.to_string()).into_response();
    for scheme in auth.schemes() {
        let challenge = format!("{scheme} realm=\"herald\"");
        if let Ok(value) = HeaderValue::from_str(&challenge) {
            response.headers_mut().append(header::WWW_AUTHENTICATE, value);
        }
    }
    response
}

/// The middleware of the `/v1` routes.
pub(crate) async fn authenticate(State(state): State<AppState>, mut req: Request, next: Next) -> Response {
    let Some(auth) = state.auth().map(|live| live.get()) else {
        req.extensions_mut().insert(Caller::Anyone);
        return next.run(req).await;
    };
    let metrics = state.broker().metrics().clone();
    let refused = |response: Response| {
        herald_core::Metrics::add(&metrics.auth_refused, 1);
        response
    };
    let header = req.headers().get(header::AUTHORIZATION).and_then(|v| v.to_str().ok());
    // Browsers cannot set headers on a WebSocket: the JSON protocol's connection opens
    // and authenticates with its first frame (ws.rs).
    if header.is_none() && req.uri().path() == "/v1/ws" && auth.takes_bearer() {
        req.extensions_mut().insert(Caller::Pending);
        return next.run(req).await;
    }
    let credentials = match header.map(Credentials::from_header) {
        None => return refused(unauthorized(&auth, &AuthError::Missing)),
        Some(None) => {
            return refused(unauthorized(
                &auth,
                &AuthError::BadToken("the Authorization header is neither Basic nor Bearer".into()),
            ))
        }
        Some(Some(c)) => c,
    };
    match auth.check(credentials).await {
        Ok(principal) => {
            req.extensions_mut().insert(Caller::User(Arc::new(principal)));
            let response = next.run(req).await;
            if response.status() == axum::http::StatusCode::FORBIDDEN {
                herald_core::Metrics::add(&metrics.forbidden, 1);
            }
            response
        }
        Err(e) => refused(unauthorized(&auth, &e)),
    }
}
