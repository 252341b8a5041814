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
use std::time::Duration;

use herald_auth::{Action, AuthError, Authenticator, Credentials, LiveAuth, Principal};
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

/// Watches an authenticated long-lived connection that serves fixed actions on one
/// name (a raw WebSocket, an SSE stream): [`Watch::ended`] resolves with the close code
/// and reason when its token expires, or when a configuration reload refuses its
/// credentials or takes away one of its actions.
pub(crate) struct Watch {
    live: Option<(Arc<LiveAuth>, tokio::sync::watch::Receiver<u64>)>,
    principal: Option<Arc<Principal>>,
    credentials: Option<Credentials>,
    actions: Vec<Action>,
    name: String,
}

impl Watch {
    /// A watch over `caller`, authenticated with `credentials`, doing `actions` on `name`.
    pub(crate) fn new(
        state: &AppState,
        caller: &Caller,
        credentials: Option<Credentials>,
        actions: Vec<Action>,
        name: &str,
    ) -> Self {
        let principal = match caller {
            Caller::User(p) => Some(p.clone()),
            Caller::Anyone | Caller::Pending => None,
        };
        let live = state.auth().filter(|_| principal.is_some()).map(|l| (l.clone(), l.changes()));
        Self { live, principal, credentials, actions, name: name.to_owned() }
    }

    /// Resolves when the connection must end (never without auth). Pin it once and
    /// poll it beside the connection's reads: a reload it is checking is not lost.
    pub(crate) async fn ended(mut self) -> (u16, &'static str) {
        use herald_protocol::close;
        loop {
            let expiry = self.principal.as_ref().and_then(|p| p.expires_at).map(|exp| {
                tokio::time::Instant::now() + Duration::from_secs(exp.saturating_sub(herald_auth::now_secs()))
            });
            let expired = async {
                match expiry {
                    Some(at) => tokio::time::sleep_until(at).await,
                    None => std::future::pending().await,
                }
            };
            let reloaded = async {
                match &mut self.live {
                    Some((_, changes)) => {
                        if changes.changed().await.is_err() {
                            std::future::pending::<()>().await;
                        }
                    }
                    None => std::future::pending().await,
                }
            };
            tokio::select! {
                () = expired => return (close::UNAUTHORIZED, "token expired"),
                () = reloaded => {}
            }
            let (Some((live, _)), Some(credentials)) = (&self.live, self.credentials.clone()) else { continue };
            match live.get().check(credentials).await {
                Err(_) => return (close::UNAUTHORIZED, "credentials no longer accepted"),
                Ok(p) if self.actions.iter().any(|a| !p.allows(*a, &self.name)) => {
                    return (close::FORBIDDEN, "grant withdrawn")
                }
                Ok(p) => self.principal = Some(Arc::new(p)),
            }
        }
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
    let header = req.headers().get(header::AUTHORIZATION).and_then(|v| v.to_str().ok());
    // Browsers cannot set headers on a WebSocket: the JSON protocol's connection opens
    // and authenticates with its first frame (ws.rs).
    if header.is_none() && req.uri().path() == "/v1/ws" && auth.takes_bearer() {
        req.extensions_mut().insert(Caller::Pending);
        return next.run(req).await;
    }
    let credentials = match header.map(Credentials::from_header) {
        None => return unauthorized(&auth, &AuthError::Missing),
        Some(None) => {
            return unauthorized(
                &auth,
                &AuthError::BadToken("the Authorization header is neither Basic nor Bearer".into()),
            )
        }
        Some(Some(c)) => c,
    };
    match auth.check(credentials).await {
        Ok(principal) => {
            req.extensions_mut().insert(Caller::User(Arc::new(principal)));
            next.run(req).await
        }
        Err(e) => unauthorized(&auth, &e),
    }
}
