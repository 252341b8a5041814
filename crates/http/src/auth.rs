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
use herald_auth::{Action, AuthError, Authenticator, Credentials, Principal};
use herald_protocol::ErrorCode;

use crate::{ApiError, AppState};

/// Who is calling: `None` when the server does not authenticate.
#[derive(Debug, Clone)]
pub(crate) struct Caller(pub(crate) Option<Arc<Principal>>);

impl Caller {
    /// `Ok` if the caller may do `action` on `name`, else a 403 `forbidden`.
    pub(crate) fn permit(&self, action: Action, name: &str) -> Result<(), ApiError> {
        match &self.0 {
            Some(p) if !p.allows(action, name) => Err(forbidden(p, action, name)),
            _ => Ok(()),
        }
    }

    /// Whether the caller may do `action` on `name`.
    pub(crate) fn allows(&self, action: Action, name: &str) -> bool {
        self.0.as_ref().is_none_or(|p| p.allows(action, name))
    }
}

/// The 403 for `principal` doing `action` on `name`.
pub(crate) fn forbidden(principal: &Principal, action: Action, name: &str) -> ApiError {
    ApiError::new(ErrorCode::Forbidden, format!("{} may not {action} on {name}", principal.name))
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
    let Some(auth) = state.auth() else {
        req.extensions_mut().insert(Caller(None));
        return next.run(req).await;
    };
    let header = req.headers().get(header::AUTHORIZATION).and_then(|v| v.to_str().ok());
    let credentials = match header.map(Credentials::from_header) {
        None => return unauthorized(auth, &AuthError::Missing),
        Some(None) => {
            return unauthorized(
                auth,
                &AuthError::BadToken("the Authorization header is neither Basic nor Bearer".into()),
            )
        }
        Some(Some(c)) => c,
    };
    match auth.check(credentials).await {
        Ok(principal) => {
            req.extensions_mut().insert(Caller(Some(Arc::new(principal))));
            next.run(req).await
        }
        Err(e) => unauthorized(auth, &e),
    }
}
