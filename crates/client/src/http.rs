//! HTTP half of the client: publish, fetch, info, delete, and the list of topics.

use serde::{Deserialize, Serialize};

use crate::ws::{Delivery, Payload};
use crate::{ClientError, TlsConfig};

/// A Herald server's address plus a pooled HTTP client; cheap to clone.
#[derive(Debug, Clone)]
pub struct Client {
    http: reqwest::Client,
    base: String,
    tls: TlsConfig,
    /// The `Authorization` header value every request (and WebSocket) carries.
    auth: Option<String>,
}

/// An `Authorization` header value for Basic auth.
pub fn basic_auth(user: &str, password: &str) -> String {
    use base64::Engine;
    format!("Basic {}", base64::engine::general_purpose::STANDARD.encode(format!("{user}:{password}")))
}

/// An `Authorization` header value for a bearer token.
pub fn bearer_auth(token: &str) -> String {
    format!("Bearer {token}")
}

/// A reqwest client trusting `tls`, sending `auth` with every request.
fn http_client(tls: &TlsConfig, auth: Option<&str>) -> Result<reqwest::Client, ClientError> {
    crate::tls::install_crypto_provider();
    let mut headers = reqwest::header::HeaderMap::new();
    if let Some(auth) = auth {
        let mut value = reqwest::header::HeaderValue::from_str(auth)
            .map_err(|_| ClientError::Protocol("the Authorization value is not a valid header".into()))?;
        value.set_sensitive(true);
        headers.insert(reqwest::header::AUTHORIZATION, value);
    }
    Ok(reqwest::Client::builder()
        .tls_backend_preconfigured(rustls::ClientConfig::clone(&tls.http1()))
        .default_headers(headers)
        .build()?)
}

/// A publish acknowledgement.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize, Serialize)]
pub struct Published {
    /// The topic.
    pub topic: String,
    /// The offset assigned.
    pub offset: u64,
    /// The acceptance time, ms since the Unix epoch.
    pub ts: u64,
}

/// A page of history from fetch.
#[derive(Debug, Clone)]
pub struct Page {
    /// The topic's epoch.
    pub epoch: String,
    /// The messages.
    pub messages: Vec<Delivery>,
    /// Where the next page starts.
    pub next: u64,
}

/// A topic's state.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
pub struct TopicInfo {
    /// The topic.
    pub topic: String,
    /// Its epoch.
    pub epoch: String,
    /// Oldest retained offset (0 if none).
    pub first: u64,
    /// Newest retained offset (0 if none).
    pub last: u64,
    /// Retained messages.
    pub retained: u64,
    /// Live subscribers on the node asked.
    pub subscribers: u64,
    /// Connections publishing to it on the node asked (0 from a server without presence).
    #[serde(default)]
    pub publishers: u64,
}

/// A topic as `GET /v1/topics` lists it.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize, Serialize)]
pub struct ListedTopic {
    /// The topic.
    pub topic: String,
    /// Newest retained offset.
    pub last: u64,
    /// Live subscribers on the node asked.
    pub subscribers: u64,
    /// Connections publishing to it on the node asked (0 from a server without presence).
    #[serde(default)]
    pub publishers: u64,
}

/// Which names a list call returns: those starting with `prefix`, after `after` (in
/// byte order), at most `limit` (1 to 1000; the server's default, 100, when 0).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct ListOptions<'a> {
    /// Only names starting with this.
    pub prefix: &'a str,
    /// Only names after this one (the last of the previous page).
    pub after: Option<&'a str>,
    /// Most names in the page.
    pub limit: u32,
}

impl ListOptions<'_> {
    /// The query string (with its `?`, or empty).
    pub(crate) fn query(&self) -> String {
        let mut pairs = Vec::new();
        if !self.prefix.is_empty() {
            pairs.push(format!("prefix={}", percent_encode(self.prefix)));
        }
        if let Some(after) = self.after {
            pairs.push(format!("after={}", percent_encode(after)));
        }
        if self.limit > 0 {
            pairs.push(format!("limit={}", self.limit));
        }
        if pairs.is_empty() {
            String::new()
        } else {
            format!("?{}", pairs.join("&"))
        }
    }
}

/// `s` with every byte but the unreserved ones (RFC 3986) percent-encoded.
pub(crate) fn percent_encode(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for b in s.bytes() {
        if b.is_ascii_alphanumeric() || matches!(b, b'-' | b'.' | b'_' | b'~') {
            out.push(b as char);
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out
}

#[derive(Deserialize)]
struct TopicList {
    topics: Vec<ListedTopic>,
}

#[derive(Deserialize)]
struct ErrorBody {
    error: ErrorDetail,
}

#[derive(Deserialize)]
struct ErrorDetail {
    code: String,
    message: String,
}

#[derive(Deserialize)]
struct RawPage {
    epoch: String,
    messages: Vec<RawFetched>,
    next: u64,
}

#[derive(Deserialize)]
struct RawFetched {
    offset: u64,
    ts: u64,
    data: Option<Box<serde_json::value::RawValue>>,
    data_b64: Option<String>,
}

impl Client {
    /// A client for the server at `base` (e.g. `http://127.0.0.1:7070`, or `https://...`
    /// checked against the system's certificate store).
    pub fn new(base: impl Into<String>) -> Self {
        Self::with_tls(base, TlsConfig::system())
    }

    /// A client whose `https://` and `wss://` connections trust `tls`.
    pub fn with_tls(base: impl Into<String>, tls: TlsConfig) -> Self {
        // With a rustls configuration given and no headers, reqwest builds no TLS
        // backend of its own nor parses anything: `build` cannot fail.
        #[allow(clippy::expect_used)]
        let http = http_client(&tls, None).expect("a reqwest client with a preconfigured rustls backend builds");
        Self { http, base: base.into().trim_end_matches('/').to_owned(), tls, auth: None }
    }

    /// This client, sending `authorization` (see [`basic_auth`], [`bearer_auth`]) with
    /// every request and WebSocket upgrade.
    pub fn authorized(self, authorization: impl Into<String>) -> Result<Self, ClientError> {
        let auth = authorization.into();
        let http = http_client(&self.tls, Some(&auth))?;
        Ok(Self { http, auth: Some(auth), ..self })
    }

    /// The `Authorization` value this client sends, if any.
    pub fn authorization(&self) -> Option<&str> {
        self.auth.as_deref()
    }

    /// The CAs this client trusts.
    pub fn tls(&self) -> &TlsConfig {
        &self.tls
    }

    pub(crate) fn http(&self) -> &reqwest::Client {
        &self.http
    }

    /// The server's base URL.
    pub fn base(&self) -> &str {
        &self.base
    }

    pub(crate) async fn check(response: reqwest::Response) -> Result<reqwest::Response, ClientError> {
        if response.status().is_success() {
            return Ok(response);
        }
        let status = response.status().as_u16();
        let body = response.bytes().await?;
        Err(match serde_json::from_slice::<ErrorBody>(&body) {
            Ok(e) => ClientError::Api { status, code: e.error.code, message: e.error.message },
            Err(_) => ClientError::Api {
                status,
                code: "unknown".into(),
                message: String::from_utf8_lossy(&body).into_owned(),
            },
        })
    }

    /// Publishes `body` with `content_type` (which decides the kind: `text/*` text,
    /// `application/json` JSON, anything else binary).
    pub async fn publish(
        &self,
        topic: &str,
        content_type: &str,
        body: impl Into<reqwest::Body>,
    ) -> Result<Published, ClientError> {
        let url = format!("{}/v1/topics/{topic}/messages", self.base);
        let response = self.http.post(url).header("content-type", content_type).body(body).send().await?;
        let bytes = Self::check(response).await?.bytes().await?;
        serde_json::from_slice(&bytes).map_err(|e| ClientError::Protocol(e.to_string()))
    }

    /// Publishes UTF-8 text.
    pub async fn publish_text(&self, topic: &str, text: impl Into<String>) -> Result<Published, ClientError> {
        self.publish(topic, "text/plain; charset=utf-8", text.into()).await
    }

    /// Fetches up to `limit` messages from offset `from`.
    pub async fn fetch(&self, topic: &str, from: u64, limit: u32) -> Result<Page, ClientError> {
        let url = format!("{}/v1/topics/{topic}/messages?from={from}&limit={limit}", self.base);
        let bytes = Self::check(self.http.get(url).send().await?).await?.bytes().await?;
        let raw: RawPage = serde_json::from_slice(&bytes).map_err(|e| ClientError::Protocol(e.to_string()))?;
        let messages = raw
            .messages
            .into_iter()
            .map(|m| {
                Ok(Delivery {
                    topic: topic.to_owned(),
                    offset: m.offset,
                    ts: m.ts,
                    payload: Payload::from_fields(m.data, m.data_b64)?,
                })
            })
            .collect::<Result<_, ClientError>>()?;
        Ok(Page { epoch: raw.epoch, messages, next: raw.next })
    }

    /// The topic's state.
    pub async fn info(&self, topic: &str) -> Result<TopicInfo, ClientError> {
        let url = format!("{}/v1/topics/{topic}", self.base);
        let bytes = Self::check(self.http.get(url).send().await?).await?.bytes().await?;
        serde_json::from_slice(&bytes).map_err(|e| ClientError::Protocol(e.to_string()))
    }

    /// One page of the topics this client may administer (all of them on a server
    /// without auth), in name order: pass the last one's name as `after` for the next.
    pub async fn list_topics(&self, options: ListOptions<'_>) -> Result<Vec<ListedTopic>, ClientError> {
        let url = format!("{}/v1/topics{}", self.base, options.query());
        let bytes = Self::check(self.http.get(url).send().await?).await?.bytes().await?;
        let list: TopicList = serde_json::from_slice(&bytes).map_err(|e| ClientError::Protocol(e.to_string()))?;
        Ok(list.topics)
    }

    /// Deletes the topic's history.
    pub async fn delete(&self, topic: &str) -> Result<(), ClientError> {
        let url = format!("{}/v1/topics/{topic}", self.base);
        Self::check(self.http.delete(url).send().await?).await?;
        Ok(())
    }
}
