//! Authentication and authorization at the HTTP doors (REST, SSE, WebSocket upgrades):
//! a middleware turns the `Authorization` header into a [`Caller`] (or answers 401 with
//! `WWW-Authenticate`), and each handler asks the caller for the action it serves
//! (403 `forbidden` when not granted). With no `[auth]` configured, every caller may do
//! everything, as before.
//!
//! Without an `Authorization` header, a TLS client certificate the listener verified
//! (`tls.client_ca`; [`ClientCert`]) names the user.
//!
//! Browsers cannot set headers on a WebSocket or an `EventSource`: on those long-lived
//! GET routes only (`/v1/ws`, `/v1/topics/{topic}/ws`, `/v1/topics/{topic}/sse`), a
//! request without `Authorization` may carry its bearer token in the configured cookie
//! (`auth.cookie`). As a browser sends that cookie whichever page opens the request, a
//! cookie is taken only with an `Origin` in `auth.allowed_origins` (403 otherwise), or
//! without `Origin` on SSE, which a page of another site cannot read (browsers always
//! send `Origin` on a WebSocket, so a WebSocket without it is refused).

use std::sync::Arc;

use axum::extract::{Request, State};
use axum::http::{header, HeaderValue};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use herald_auth::{Action, AuthError, Authenticator, ClientCert, Credentials, Ended, Principal, Watch};
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

/// The credentials a request was authenticated with (its `Authorization` header or its
/// cookie), kept by long-lived connections to check them again after a reload.
#[derive(Debug, Clone)]
pub(crate) struct Presented(pub(crate) Credentials);

/// The credentials a request was authenticated with, if any.
pub(crate) fn credentials_of(presented: Option<axum::Extension<Presented>>) -> Option<Credentials> {
    presented.map(|axum::Extension(Presented(c))| c)
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

/// The long-lived GET routes a browser opens without being able to set a header.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum BrowserRoute {
    /// `/v1/ws` or `/v1/topics/{topic}/ws`.
    WebSocket,
    /// `/v1/topics/{topic}/sse`.
    Sse,
}

/// Which browser route `req` asks for, if any.
fn browser_route(req: &Request) -> Option<BrowserRoute> {
    if req.method() != axum::http::Method::GET {
        return None;
    }
    let path = req.uri().path();
    if path == "/v1/ws" {
        return Some(BrowserRoute::WebSocket);
    }
    let (topic, tail) = path.strip_prefix("/v1/topics/")?.split_once('/')?;
    match tail {
        _ if topic.is_empty() => None,
        "ws" => Some(BrowserRoute::WebSocket),
        "sse" => Some(BrowserRoute::Sse),
        _ => None,
    }
}

/// The value of the cookie `name` in the `Cookie` headers (the first non-empty one).
fn cookie(headers: &axum::http::HeaderMap, name: &str) -> Option<String> {
    headers
        .get_all(header::COOKIE)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(';'))
        .filter_map(|pair| pair.trim().split_once('='))
        .filter(|(n, _)| n.trim() == name)
        .map(|(_, value)| value.trim())
        .map(|value| value.strip_prefix('"').and_then(|v| v.strip_suffix('"')).unwrap_or(value))
        .find(|value| !value.is_empty())
        .map(str::to_owned)
}

/// The `Origin` of a cookie-authenticated request to `route`, if it is allowed: one of
/// `allowed_origins`, or none on SSE. Else the 403.
fn cookie_origin(auth: &Authenticator, req: &Request, route: BrowserRoute) -> Result<Option<String>, ApiError> {
    match req.headers().get(header::ORIGIN) {
        Some(value) => match value.to_str() {
            Ok(origin) if auth.allows_origin(origin) => Ok(Some(origin.to_owned())),
            _ => Err(ApiError::new(
                ErrorCode::Forbidden,
                format!("origin {} not allowed", String::from_utf8_lossy(value.as_bytes())),
            )),
        },
        // A page of another site cannot read an SSE response without CORS.
        None if route == BrowserRoute::Sse => Ok(None),
        // Browsers always send Origin on a WebSocket: one without it is not a browser's
        // page, and the cookie is a browser's credential.
        None => Err(ApiError::new(ErrorCode::Forbidden, "a WebSocket authenticated by cookie must send Origin")),
    }
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
    let header = req.headers().get(header::AUTHORIZATION).map(|v| v.to_str().ok().and_then(Credentials::from_header));
    let certificate = req.extensions().get::<ClientCert>().map(|c| Credentials::Certificate(c.0.to_string()));
    let credentials = match (header, certificate) {
        (Some(Some(c)), _) => c,
        (Some(None), _) => {
            return refused(unauthorized(
                &auth,
                &AuthError::BadToken("the Authorization header is neither Basic nor Bearer".into()),
            ))
        }
        // No header: a verified TLS client certificate of the connection names the user.
        (None, Some(c)) => c,
        // No header: a browser's long-lived GET may carry its token in the cookie.
        (None, None) => {
            let route = browser_route(&req);
            let token = route.and(auth.cookie()).and_then(|name| cookie(req.headers(), name));
            match (route, token) {
                (Some(route), Some(token)) => match cookie_origin(&auth, &req, route) {
                    Ok(origin) => Credentials::Cookie { token, origin },
                    Err(e) => {
                        herald_core::Metrics::add(&metrics.forbidden, 1);
                        return e.into_response();
                    }
                },
                // The JSON protocol's connection may open without credentials and
                // authenticate with its first frame (ws.rs).
                _ if req.uri().path() == "/v1/ws" && auth.takes_bearer() => {
                    req.extensions_mut().insert(Caller::Pending);
                    return next.run(req).await;
                }
                _ => return refused(unauthorized(&auth, &AuthError::Missing)),
            }
        }
    };
    match auth.check(&credentials).await {
        Ok(principal) => {
            req.extensions_mut().insert(Caller::User(Arc::new(principal)));
            req.extensions_mut().insert(Presented(credentials));
            let response = next.run(req).await;
            if response.status() == axum::http::StatusCode::FORBIDDEN {
                herald_core::Metrics::add(&metrics.forbidden, 1);
            }
            response
        }
        Err(e) => refused(unauthorized(&auth, &e)),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use axum::body::Body;
    use axum::http::HeaderMap;

    fn request(method: &str, path: &str) -> Request {
        Request::builder().method(method).uri(path).body(Body::empty()).unwrap_or_default()
    }

    #[test]
    fn only_browsers_long_lived_get_routes_take_the_cookie() {
        let route = |method: &str, path: &str| browser_route(&request(method, path));
        assert_eq!(route("GET", "/v1/ws"), Some(BrowserRoute::WebSocket));
        assert_eq!(route("GET", "/v1/topics/chat.room/ws?mode=sub"), Some(BrowserRoute::WebSocket));
        assert_eq!(route("GET", "/v1/topics/chat.room/sse?from=earliest"), Some(BrowserRoute::Sse));
        assert_eq!(route("GET", "/v1/topics/chat%2Froom/sse"), Some(BrowserRoute::Sse));
        for (method, path) in [
            ("POST", "/v1/topics/chat.room/messages"),
            ("GET", "/v1/topics/chat.room/messages"),
            ("GET", "/v1/topics/chat.room"),
            ("GET", "/v1/topics//sse"),
            ("GET", "/v1/topics/a/b/sse"),
            ("GET", "/v1/topics/chat.room/sse/"),
            ("POST", "/v1/topics/chat.room/sse"),
            ("GET", "/v1/queues/jobs/fetch"),
            ("GET", "/v1/wsx"),
        ] {
            assert_eq!(route(method, path), None, "{method} {path}");
        }
    }

    #[test]
    fn the_cookie_is_found_among_others() {
        let headers = |values: &[&str]| {
            let mut h = HeaderMap::new();
            for v in values {
                h.append(header::COOKIE, HeaderValue::from_str(v).unwrap_or(HeaderValue::from_static("")));
            }
            h
        };
        let find = |values: &[&str]| cookie(&headers(values), "herald_token");
        assert_eq!(find(&["herald_token=abc.def.ghi"]), Some("abc.def.ghi".into()));
        assert_eq!(find(&["theme=dark; herald_token=a.b.c; lang=en"]), Some("a.b.c".into()));
        assert_eq!(find(&["theme=dark", "herald_token=a.b.c"]), Some("a.b.c".into()), "HTTP/2 splits Cookie");
        assert_eq!(find(&["herald_token=\"a.b.c\""]), Some("a.b.c".into()));
        assert_eq!(find(&["herald_token=; herald_token=a.b.c"]), Some("a.b.c".into()));
        assert_eq!(find(&["x_herald_token=a.b.c; herald_tokens=x"]), None);
        assert_eq!(find(&["herald_token", ";;;", "=", "herald_token="]), None);
        assert_eq!(find(&[]), None);
    }

    proptest::proptest! {
        /// Fuzz harness (proptest, stable Rust) for `Cookie` headers, which every client
        /// controls: any header values give the cookie or nothing, never a panic, and a
        /// value found is a non-empty part of what was sent.
        #[test]
        fn any_cookie_header_gives_the_cookie_or_nothing(values in proptest::collection::vec("[ -~]{0,80}", 0..4)) {
            let mut headers = HeaderMap::new();
            for v in &values {
                if let Ok(value) = HeaderValue::from_str(v) {
                    headers.append(header::COOKIE, value);
                }
            }
            if let Some(found) = cookie(&headers, "herald_token") {
                proptest::prop_assert!(!found.is_empty());
                proptest::prop_assert!(values.iter().any(|v| v.contains(found.as_str())));
            }
        }

        #[test]
        fn cookie_shaped_headers_give_the_cookie_or_nothing(v in "((herald_token|x|y)=\"?[a-zA-Z0-9._-]{0,20}\"?; ?){0,4}") {
            let mut headers = HeaderMap::new();
            if let Ok(value) = HeaderValue::from_str(&v) {
                headers.append(header::COOKIE, value);
            }
            if let Some(found) = cookie(&headers, "herald_token") {
                let plain = format!("herald_token={found}");
                let quoted = format!("herald_token=\"{found}\"");
                proptest::prop_assert!(v.contains(&plain) || v.contains(&quoted), "{} in {}", found, v);
            }
        }
    }
}
