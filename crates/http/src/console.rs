//! The web console: the static page at `/` and its assets at `/console/{file}`, embedded
//! in the binary at compile time from the workspace's `console/` directory (and the
//! JavaScript client, `clients/js/src/herald.js`), so there is nothing to build or deploy
//! beside `herald`. Merged into the router by [`crate::router`] when
//! [`crate::HttpConfig::console`] is on.
//!
//! The routes need no credentials: they serve only static files; the page itself calls
//! the `/v1` API with whatever credentials its user types. Every answer carries a strict
//! Content-Security-Policy (scripts, styles and connections only from this origin, no
//! inline script), so the page can run nothing but the files below.

use axum::extract::Path;
use axum::http::{header, HeaderMap, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use axum::Router;
use herald_protocol::ErrorCode;

use crate::{ApiError, AppState};

/// The policy of every console answer. `connect-src 'self'` covers this origin's
/// `ws://`/`wss://` too (CSP level 3), which the WebSocket client needs.
const CSP: &str = "default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self'; \
                   connect-src 'self'; base-uri 'none'; form-action 'none'; frame-ancestors 'none'";

/// One embedded file.
struct Asset {
    name: &'static str,
    content_type: &'static str,
    body: &'static [u8],
    /// A strong validator of `body`, computed at compile time.
    etag: &'static str,
}

macro_rules! asset {
    ($name:literal, $type:expr, $path:literal) => {{
        const BODY: &[u8] = include_bytes!($path);
        const HASH: [u8; 18] = etag(fnv1a(BODY));
        Asset {
            name: $name,
            content_type: $type,
            body: BODY,
            etag: match std::str::from_utf8(&HASH) {
                Ok(s) => s,
                Err(_) => panic!("an etag is ASCII"),
            },
        }
    }};
}

const JS: &str = "text/javascript; charset=utf-8";

/// Everything under `/console/`; `index.html` is also `/`.
static ASSETS: &[Asset] = &[
    asset!("index.html", "text/html; charset=utf-8", "../../../console/index.html"),
    asset!("style.css", "text/css; charset=utf-8", "../../../console/style.css"),
    asset!("favicon.svg", "image/svg+xml", "../../../console/favicon.svg"),
    asset!("app.js", JS, "../../../console/app.js"),
    asset!("util.js", JS, "../../../console/util.js"),
    asset!("topics.js", JS, "../../../console/topics.js"),
    asset!("queues.js", JS, "../../../console/queues.js"),
    asset!("metrics.js", JS, "../../../console/metrics.js"),
    asset!("herald.js", JS, "../../../clients/js/src/herald.js"),
];

/// The console's routes.
pub(crate) fn routes() -> Router<AppState> {
    Router::new().route("/", get(index)).route("/console/{file}", get(file))
}

async fn index(headers: HeaderMap) -> Response {
    serve("index.html", &headers)
}

async fn file(Path(file): Path<String>, headers: HeaderMap) -> Response {
    serve(&file, &headers)
}

fn serve(name: &str, request: &HeaderMap) -> Response {
    let Some(asset) = ASSETS.iter().find(|a| a.name == name) else {
        return ApiError::new(ErrorCode::NotFound, "no such console file").into_response();
    };
    let fresh = request
        .get(header::IF_NONE_MATCH)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|tags| tags.split(',').any(|t| t.trim() == asset.etag || t.trim() == "*"));
    let mut response = if fresh {
        StatusCode::NOT_MODIFIED.into_response()
    } else {
        ([(header::CONTENT_TYPE, asset.content_type)], asset.body).into_response()
    };
    let headers = response.headers_mut();
    headers.insert(header::ETAG, HeaderValue::from_static(asset.etag));
    // Kept, but checked again each time (a 304 while unchanged): the names carry no
    // hash, and a new binary must not run with an old page's scripts.
    headers.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-cache"));
    headers.insert(header::CONTENT_SECURITY_POLICY, HeaderValue::from_static(CSP));
    headers.insert(header::X_CONTENT_TYPE_OPTIONS, HeaderValue::from_static("nosniff"));
    headers.insert(header::REFERRER_POLICY, HeaderValue::from_static("no-referrer"));
    response
}

/// 64-bit FNV-1a of `bytes`: enough to tell versions of a file apart.
const fn fnv1a(bytes: &[u8]) -> u64 {
    let mut hash: u64 = 0xcbf2_9ce4_8422_2325;
    let mut i = 0;
    while i < bytes.len() {
        hash ^= bytes[i] as u64;
        hash = hash.wrapping_mul(0x0000_0100_0000_01b3);
        i += 1;
    }
    hash
}

/// `hash` as a quoted ETag of 16 hex digits.
const fn etag(hash: u64) -> [u8; 18] {
    const HEX: &[u8; 16] = b"0123456789abcdef";
    let mut out = [b'"'; 18];
    let mut i = 0;
    while i < 16 {
        out[1 + i] = HEX[((hash >> (60 - 4 * i)) & 0xf) as usize];
        i += 1;
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn etags_are_quoted_hex_and_differ() {
        let names: Vec<&str> = ASSETS.iter().map(|a| a.etag).collect();
        for tag in &names {
            assert_eq!(tag.len(), 18);
            assert!(tag.starts_with('"') && tag.ends_with('"'), "{tag}");
        }
        let mut unique = names.clone();
        unique.sort_unstable();
        unique.dedup();
        assert_eq!(unique.len(), names.len());
        assert_eq!(fnv1a(b""), 0xcbf2_9ce4_8422_2325);
        assert_eq!(&etag(0x0123_4567_89ab_cdef), b"\"0123456789abcdef\"");
    }

    #[test]
    fn unknown_files_and_matching_etags() {
        let empty = HeaderMap::new();
        assert_eq!(serve("nope.js", &empty).status(), StatusCode::NOT_FOUND);
        let app = serve("app.js", &empty);
        assert_eq!(app.status(), StatusCode::OK);
        let tag = app.headers().get(header::ETAG).cloned().expect("an etag");
        let mut again = HeaderMap::new();
        again.insert(header::IF_NONE_MATCH, tag);
        assert_eq!(serve("app.js", &again).status(), StatusCode::NOT_MODIFIED);
    }
}
