//! Who a caller is, and what it may do: Herald's authentication and authorization, the
//! same for every door (REST, SSE, WebSocket, gRPC; docs/security.md).
//!
//! - [`grants`]: actions over name patterns (`*`, `>`, `{user}`), deny wins.
//! - [`Authenticator`]: turns credentials into a [`Principal`]: Basic auth against
//!   configured users (argon2 or bcrypt hashes; verified once, then remembered for a
//!   while so that a REST client does not pay a hash per request), or a JWT bearer
//!   token checked against the configured keys, with the algorithm pinned by the
//!   configuration, `exp` required, `iss` / `aud` checked when configured, and the
//!   rights taken from a claim. The same token may come in a cookie (`auth.cookie`,
//!   for browsers), accepted only from the pages of `auth.allowed_origins`.
//!
//! The doors ask [`Authenticator::authenticate`] once per connection (or request) and
//! [`Principal::allows`] per action, caching decisions per connection.

pub mod grants;
mod jwt;
pub mod limits;

use std::collections::hash_map::RandomState;
use std::collections::HashMap;
use std::hash::BuildHasher;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use base64::Engine;
use serde::Deserialize;

pub use grants::{Action, Grants, GrantsSpec, Pattern, PatternError};
pub use jwt::{JwtConfig, JwtError};

/// How long a verified Basic password is remembered (a changed configuration drops it).
const VERIFIED_FOR: Duration = Duration::from_secs(300);
/// Verified Basic credentials remembered at most (then the memory starts over).
const VERIFIED_MAX: usize = 10_000;

/// The `[auth]` section: users for Basic auth, JWT settings, or both.
#[derive(Debug, Clone, Default, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct AuthConfig {
    /// Users that log in with Basic auth.
    #[serde(default)]
    pub users: Vec<UserConfig>,
    /// Bearer tokens.
    pub jwt: Option<JwtConfig>,
    /// The name of a cookie carrying a bearer token, taken by browsers' long-lived GET
    /// routes (WebSocket, SSE); needs `jwt` and `allowed_origins`.
    pub cookie: Option<String>,
    /// The origins (`https://app.example.com`) whose pages may use the cookie.
    #[serde(default)]
    pub allowed_origins: Vec<String>,
}

/// One `[[auth.users]]` entry.
#[derive(Debug, Clone, Default, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct UserConfig {
    /// The user name (also what `{user}` expands to).
    pub name: String,
    /// An argon2 (`$argon2id$...`) or bcrypt (`$2b$...`) hash; `herald passwd` makes one.
    pub password_hash: Option<String>,
    /// Refused: a plain-text password (present only to say so clearly).
    pub password: Option<String>,
    /// What the user may do.
    #[serde(default)]
    pub grants: GrantsSpec,
}

/// Why the `[auth]` section cannot be used.
#[derive(Debug, thiserror::Error)]
pub enum AuthConfigError {
    /// A user entry is wrong.
    #[error("auth.users {name:?}: {why}")]
    User {
        /// The user.
        name: String,
        /// What is wrong.
        why: String,
    },
    /// A grant pattern does not parse.
    #[error("{0}")]
    Pattern(#[from] PatternError),
    /// The JWT settings are wrong.
    #[error("auth.jwt: {0}")]
    Jwt(#[from] JwtError),
    /// The cookie settings are wrong (the message names the key).
    #[error("{0}")]
    Cookie(String),
    /// An allowed origin is not an origin.
    #[error("auth.allowed_origins {origin:?}: {why}")]
    Origin {
        /// The origin as configured.
        origin: String,
        /// What is wrong.
        why: String,
    },
}

/// An authenticated caller.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Principal {
    /// The user name (Basic) or the token's `sub`.
    pub name: Arc<str>,
    /// What it may do.
    pub grants: Arc<Grants>,
    /// When its credentials expire (a token's `exp`), in seconds since the Unix epoch.
    pub expires_at: Option<u64>,
}

impl Principal {
    /// Whether the caller may do `action` on the topic or queue `name`.
    pub fn allows(&self, action: Action, name: &str) -> bool {
        self.grants.allows(&self.name, action, name)
    }

    /// When its credentials expire, on tokio's clock (`None`: they do not).
    pub fn expiry(&self) -> Option<tokio::time::Instant> {
        let left = |exp: u64| Duration::from_secs(exp.saturating_sub(now_secs()));
        self.expires_at.map(|exp| tokio::time::Instant::now() + left(exp))
    }
}

/// Credentials as a request carries them.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Credentials {
    /// `Authorization: Basic`.
    Basic {
        /// The user name.
        user: String,
        /// The password.
        password: String,
    },
    /// `Authorization: Bearer`, or a token given in-band.
    Bearer(String),
    /// A TLS client certificate the server verified against `tls.client_ca`: the name
    /// of its subject (Common Name), a user of `[[auth.users]]`.
    Certificate(String),
    /// A bearer token from the configured cookie, with the `Origin` of the request that
    /// carried it (none: the request had no `Origin`). Checked as a bearer token, and
    /// only while cookies are configured and the origin is allowed.
    Cookie {
        /// The token.
        token: String,
        /// The request's `Origin`.
        origin: Option<String>,
    },
}

impl Credentials {
    /// Parses an `Authorization` header value (`Basic ...` or `Bearer ...`, scheme
    /// case-insensitive); `None` for anything else.
    pub fn from_header(value: &str) -> Option<Self> {
        let (scheme, rest) = value.trim().split_once(' ')?;
        let rest = rest.trim();
        if scheme.eq_ignore_ascii_case("bearer") && !rest.is_empty() {
            return Some(Credentials::Bearer(rest.to_owned()));
        }
        if !scheme.eq_ignore_ascii_case("basic") {
            return None;
        }
        let decoded = base64::engine::general_purpose::STANDARD.decode(rest).ok()?;
        let text = String::from_utf8(decoded).ok()?;
        let (user, password) = text.split_once(':')?;
        Some(Credentials::Basic { user: user.to_owned(), password: password.to_owned() })
    }
}

/// The TLS client certificate a connection presented and the server verified against
/// `tls.client_ca`: its subject's Common Name. The listener puts it on every request
/// of the connection; the doors turn it into [`Credentials::Certificate`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ClientCert(pub Arc<str>);

/// Why credentials were refused (each reaches the client as `unauthorized`).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum AuthError {
    /// No credentials were given.
    #[error("credentials required: send Authorization: Basic or Bearer")]
    Missing,
    /// The user is unknown or the password wrong (never saying which).
    #[error("wrong user name or password")]
    BadPassword,
    /// Basic auth is not configured (no users).
    #[error("Basic auth is not enabled on this server; use a bearer token")]
    NoBasic,
    /// Bearer tokens are not configured.
    #[error("bearer tokens are not enabled on this server; use Basic auth")]
    NoBearer,
    /// The token was refused.
    #[error("token refused: {0}")]
    BadToken(String),
    /// A verified client certificate names no configured user.
    #[error("the client certificate's name {0:?} is not a user of this server")]
    UnknownCertificate(String),
    /// A token came in a cookie, and cookies are not configured.
    #[error("cookies are not enabled on this server; send Authorization: Bearer")]
    NoCookie,
    /// A cookie came from a page whose origin is not allowed (the HTTP doors check the
    /// origin first and answer 403; this is what a reload that drops the origin finds).
    #[error("origin {0} not allowed")]
    Origin(String),
}

struct User {
    /// `None`: a user who logs in with a client certificate only.
    hash: Option<String>,
    grants: Arc<Grants>,
}

/// Checks credentials against the configuration. Cheap to share (`Arc`).
pub struct Authenticator {
    users: HashMap<String, User>,
    jwt: Option<jwt::Jwt>,
    /// The cookie carrying a token, if any.
    cookie: Option<String>,
    /// The origins allowed to use it, as [`parse_origin`] writes them.
    origins: Vec<String>,
    /// Basic credentials verified recently: keyed hash of (user, password) -> when.
    verified: Mutex<HashMap<u64, Instant>>,
    hasher: RandomState,
}

impl std::fmt::Debug for Authenticator {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Authenticator").field("users", &self.users.len()).field("jwt", &self.jwt.is_some()).finish()
    }
}

/// The server's current [`Authenticator`], replaced by a configuration reload; every
/// live connection watches [`LiveAuth::changes`] to check its caller again.
pub struct LiveAuth {
    current: std::sync::RwLock<Arc<Authenticator>>,
    changes: tokio::sync::watch::Sender<u64>,
}

impl LiveAuth {
    /// Starts with `auth`.
    pub fn new(auth: Authenticator) -> Self {
        Self { current: std::sync::RwLock::new(Arc::new(auth)), changes: tokio::sync::watch::Sender::new(0) }
    }

    /// The authenticator in force.
    pub fn get(&self) -> Arc<Authenticator> {
        self.current.read().unwrap_or_else(|e| e.into_inner()).clone()
    }

    /// Checks `config` and puts it in force; live connections are told. A wrong
    /// configuration changes nothing.
    pub fn reload(&self, config: &AuthConfig) -> Result<(), AuthConfigError> {
        let auth = Authenticator::new(config)?;
        *self.current.write().unwrap_or_else(|e| e.into_inner()) = Arc::new(auth);
        self.changes.send_modify(|n| *n += 1);
        Ok(())
    }

    /// Notified at every reload.
    pub fn changes(&self) -> tokio::sync::watch::Receiver<u64> {
        self.changes.subscribe()
    }
}

/// Why a watched connection must end.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Ended {
    /// Its token expired.
    Expired,
    /// A reload no longer accepts its credentials.
    Refused,
    /// A reload took away one of its actions.
    Withdrawn,
}

/// Watches an authenticated long-lived connection that does fixed actions on one name
/// (a raw WebSocket, an SSE stream, a gRPC Subscribe stream): [`Watch::ended`]
/// resolves when its token expires, or when a reload refuses its credentials or takes
/// away one of its actions.
pub struct Watch {
    live: Option<(Arc<LiveAuth>, tokio::sync::watch::Receiver<u64>)>,
    principal: Option<Arc<Principal>>,
    credentials: Option<Credentials>,
    actions: Vec<Action>,
    name: String,
}

impl Watch {
    /// A watch over `principal` (none: nothing to watch, it never ends), authenticated
    /// with `credentials` under `live`, doing `actions` on `name`.
    pub fn new(
        live: Option<&Arc<LiveAuth>>,
        principal: Option<Arc<Principal>>,
        credentials: Option<Credentials>,
        actions: Vec<Action>,
        name: &str,
    ) -> Self {
        let live = live.filter(|_| principal.is_some()).map(|l| (l.clone(), l.changes()));
        Self { live, principal, credentials, actions, name: name.to_owned() }
    }

    /// Resolves when the connection must end (never without a principal). Pin it once
    /// and poll it beside the connection's work, so a reload being checked is not lost.
    pub async fn ended(mut self) -> Ended {
        loop {
            let expiry = self.principal.as_ref().and_then(|p| p.expiry());
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
                () = expired => return Ended::Expired,
                () = reloaded => {}
            }
            let (Some((live, _)), Some(credentials)) = (&self.live, &self.credentials) else { continue };
            match live.get().check(credentials).await {
                Err(_) => return Ended::Refused,
                Ok(p) if self.actions.iter().any(|a| !p.allows(*a, &self.name)) => return Ended::Withdrawn,
                Ok(p) => self.principal = Some(Arc::new(p)),
            }
        }
    }
}

/// Seconds since the Unix epoch.
pub fn now_secs() -> u64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map_or(0, |d| d.as_secs())
}

impl Authenticator {
    /// Checks the configuration: every hash parses as argon2 or bcrypt (a plain-text
    /// password is refused), every pattern parses, the JWT keys load.
    pub fn new(config: &AuthConfig) -> Result<Self, AuthConfigError> {
        let mut users = HashMap::new();
        for u in &config.users {
            let fail = |why: &str| AuthConfigError::User { name: u.name.clone(), why: why.to_owned() };
            if u.name.is_empty() || u.name.contains(':') {
                return Err(fail("a user name must be non-empty and without ':'"));
            }
            if u.password.is_some() {
                return Err(fail(
                    "plain-text passwords are refused; put the output of `herald passwd` in password_hash",
                ));
            }
            // Without a hash the user logs in with a client certificate only.
            let hash = u.password_hash.clone();
            if hash.as_deref().is_some_and(|h| !is_known_hash(h)) {
                return Err(fail("password_hash is neither an argon2 ($argon2id$...) nor a bcrypt ($2b$...) hash"));
            }
            if users.insert(u.name.clone(), User { hash, grants: Arc::new(u.grants.build()?) }).is_some() {
                return Err(fail("the user is listed twice"));
            }
        }
        let jwt = config.jwt.as_ref().map(jwt::Jwt::new).transpose()?;
        let origins = config
            .allowed_origins
            .iter()
            .map(|o| parse_origin(o).map_err(|why| AuthConfigError::Origin { origin: o.clone(), why: why.to_owned() }))
            .collect::<Result<Vec<_>, _>>()?;
        let cookie_error = |why: &str| AuthConfigError::Cookie(why.to_owned());
        match &config.cookie {
            Some(name) => {
                if !is_cookie_name(name) {
                    return Err(cookie_error(&format!(
                        "auth.cookie {name:?} is not a cookie name (letters, digits and !#$%&'*+-.^_`|~ only)"
                    )));
                }
                if jwt.is_none() {
                    return Err(cookie_error("auth.cookie needs [auth.jwt]: the cookie carries a bearer token"));
                }
                if origins.is_empty() {
                    return Err(cookie_error(
                        "auth.cookie is set but auth.allowed_origins is empty: list the origins of the pages that may use the cookie, \
                         e.g. allowed_origins = [\"https://app.example.com\"]",
                    ));
                }
            }
            None if !origins.is_empty() => {
                return Err(cookie_error(
                    "auth.allowed_origins is set without auth.cookie: origins are checked only for \
                     requests authenticated by the cookie; set cookie = \"herald_token\" or remove them",
                ))
            }
            None => {}
        }
        Ok(Self {
            users,
            jwt,
            cookie: config.cookie.clone(),
            origins,
            verified: Mutex::new(HashMap::new()),
            hasher: RandomState::new(),
        })
    }

    /// The name of the cookie that carries a bearer token, if cookies are configured.
    pub fn cookie(&self) -> Option<&str> {
        self.cookie.as_deref()
    }

    /// Whether `origin` (an `Origin` header's value) is one of `allowed_origins`.
    pub fn allows_origin(&self, origin: &str) -> bool {
        self.origins.iter().any(|o| o.eq_ignore_ascii_case(origin))
    }

    /// Checks `credentials`. A Basic password is verified with its hash once (CPU-heavy
    /// by design: call this off the async workers, e.g. in `spawn_blocking`), then
    /// remembered for a few minutes.
    pub fn authenticate(&self, credentials: &Credentials) -> Result<Principal, AuthError> {
        self.verify(credentials, true).unwrap_or(Err(AuthError::BadPassword))
    }

    /// [`Authenticator::authenticate`], or `None` when that would hash a password and
    /// `may_hash` is false.
    fn verify(&self, credentials: &Credentials, may_hash: bool) -> Option<Result<Principal, AuthError>> {
        Some(match credentials {
            Credentials::Basic { user, password } => {
                if self.users.is_empty() {
                    return Some(Err(AuthError::NoBasic));
                }
                let Some((u, hash)) = self.users.get(user).and_then(|u| Some((u, u.hash.as_deref()?))) else {
                    return Some(Err(AuthError::BadPassword));
                };
                let key = self.hasher.hash_one((user, password));
                let remembered = lock(&self.verified).get(&key).is_some_and(|at| at.elapsed() < VERIFIED_FOR);
                if !remembered {
                    if !may_hash {
                        return None;
                    }
                    if !verify_password(password, hash) {
                        return Some(Err(AuthError::BadPassword));
                    }
                    let mut verified = lock(&self.verified);
                    if verified.len() >= VERIFIED_MAX {
                        verified.clear();
                    }
                    verified.insert(key, Instant::now());
                }
                Ok(Principal { name: Arc::from(user.as_str()), grants: u.grants.clone(), expires_at: None })
            }
            Credentials::Certificate(name) => match self.users.get(name) {
                Some(u) => Ok(Principal { name: Arc::from(name.as_str()), grants: u.grants.clone(), expires_at: None }),
                None => Err(AuthError::UnknownCertificate(name.clone())),
            },
            Credentials::Bearer(token) => self.check_token(token),
            Credentials::Cookie { token, origin } => {
                if self.cookie.is_none() {
                    return Some(Err(AuthError::NoCookie));
                }
                if let Some(origin) = origin.as_deref().filter(|o| !self.allows_origin(o)) {
                    return Some(Err(AuthError::Origin(origin.to_owned())));
                }
                self.check_token(token)
            }
        })
    }

    fn check_token(&self, token: &str) -> Result<Principal, AuthError> {
        match &self.jwt {
            Some(jwt) => jwt.check(token, now_secs()).map_err(|e| AuthError::BadToken(e.to_string())),
            None => Err(AuthError::NoBearer),
        }
    }

    /// Whether bearer tokens are configured.
    pub fn takes_bearer(&self) -> bool {
        self.jwt.is_some()
    }

    /// The `WWW-Authenticate` schemes this server takes (`Basic`, `Bearer`).
    pub fn schemes(&self) -> Vec<&'static str> {
        let mut schemes = Vec::new();
        if !self.users.is_empty() {
            schemes.push("Basic");
        }
        if self.jwt.is_some() {
            schemes.push("Bearer");
        }
        schemes
    }

    /// [`Authenticator::authenticate`] for async callers: a Basic password not verified
    /// yet is hashed on a blocking thread, never on an async worker.
    pub async fn check(self: &Arc<Self>, credentials: &Credentials) -> Result<Principal, AuthError> {
        if let Some(checked) = self.verify(credentials, false) {
            return checked;
        }
        let (auth, credentials) = (self.clone(), credentials.clone());
        tokio::task::spawn_blocking(move || auth.authenticate(&credentials))
            .await
            .unwrap_or(Err(AuthError::BadPassword))
    }
}

/// Whether `name` is a cookie name: an HTTP token (RFC 6265 section 4.1.1), visible
/// ASCII without separators.
fn is_cookie_name(name: &str) -> bool {
    !name.is_empty() && name.bytes().all(|b| (0x21..0x7f).contains(&b) && !b"()<>@,;:\\\"/[]?={}".contains(&b))
}

/// An allowed origin as a browser writes it in `Origin`: `scheme://host[:port]`, scheme
/// `http` or `https`, lower case, without a default port (`:443`, `:80`); no path
/// (not even `/`), query, user or wildcard.
fn parse_origin(origin: &str) -> Result<String, &'static str> {
    if origin == "null" {
        return Err(
            "\"null\" is the origin of sandboxed and file:// pages, which anyone can make; it cannot be allowed",
        );
    }
    if origin.contains('*') {
        return Err("exact origins only, no wildcards");
    }
    let Some((scheme, rest)) = origin.split_once("://") else {
        return Err("expected scheme://host[:port], e.g. https://app.example.com");
    };
    let scheme = scheme.to_ascii_lowercase();
    let default_port = match scheme.as_str() {
        "https" => "443",
        "http" => "80",
        _ => return Err("the scheme of a web page's origin is http or https"),
    };
    if rest.contains(['/', '?', '#', '@']) || rest.chars().any(char::is_whitespace) {
        return Err("an origin is scheme://host[:port], without a path (not even a trailing /), query or user");
    }
    let (host, port) = match rest.strip_prefix('[') {
        // An IPv6 address.
        Some(inner) => {
            let (address, after) = inner.split_once(']').ok_or("an IPv6 host needs its closing ]")?;
            if address.is_empty() || !address.chars().all(|c| c.is_ascii_hexdigit() || c == ':' || c == '.') {
                return Err("not an IPv6 address between [ ]");
            }
            let port = match after {
                "" => None,
                _ => Some(after.strip_prefix(':').ok_or("only :port may follow the host")?),
            };
            (&rest[..address.len() + 2], port)
        }
        None => {
            let (host, port) = match rest.split_once(':') {
                Some((host, port)) => (host, Some(port)),
                None => (rest, None),
            };
            if host.is_empty() || !host.chars().all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '.') {
                return Err("the host must be a DNS name (IDNs in their xn-- form) or an IP address");
            }
            (host, port)
        }
    };
    let port = match port {
        None => None,
        Some(p) if p.bytes().all(|b| b.is_ascii_digit()) && p.parse::<u16>().is_ok_and(|n| n > 0) => {
            Some(p.trim_start_matches('0'))
        }
        Some(_) => return Err("the port must be a number from 1 to 65535"),
    };
    let host = host.to_ascii_lowercase();
    Ok(match port {
        Some(p) if p != default_port => format!("{scheme}://{host}:{p}"),
        _ => format!("{scheme}://{host}"),
    })
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

fn is_known_hash(hash: &str) -> bool {
    if hash.starts_with("$2a$") || hash.starts_with("$2b$") || hash.starts_with("$2y$") {
        return hash.parse::<bcrypt::HashParts>().is_ok();
    }
    hash.starts_with("$argon2") && argon2::PasswordHash::new(hash).is_ok()
}

fn verify_password(password: &str, hash: &str) -> bool {
    if hash.starts_with("$2") {
        return bcrypt::verify(password, hash).unwrap_or(false);
    }
    use argon2::PasswordVerifier;
    match argon2::PasswordHash::new(hash) {
        Ok(parsed) => argon2::Argon2::default().verify_password(password.as_bytes(), &parsed).is_ok(),
        Err(_) => false,
    }
}

/// An argon2id hash of `password` with a random salt, for `password_hash`.
pub fn hash_password(password: &str) -> Result<String, String> {
    use argon2::password_hash::rand_core::OsRng;
    use argon2::password_hash::{PasswordHasher, SaltString};
    let salt = SaltString::generate(&mut OsRng);
    argon2::Argon2::default()
        .hash_password(password.as_bytes(), &salt)
        .map(|h| h.to_string())
        .map_err(|e| e.to_string())
}

/// Where a secret comes from: a file, or an environment variable.
#[derive(Debug, Clone, Default, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct SecretSource {
    /// A file holding the secret (trailing newline ignored).
    pub file: Option<PathBuf>,
    /// The name of an environment variable holding it.
    pub env: Option<String>,
}

#[cfg(test)]
mod tests {
    use super::*;

    fn user(name: &str, password: &str, publish: &[&str]) -> UserConfig {
        UserConfig {
            name: name.into(),
            password_hash: Some(hash_password(password).unwrap_or_default()),
            password: None,
            grants: GrantsSpec { publish: publish.iter().map(|s| s.to_string()).collect(), ..Default::default() },
        }
    }

    #[test]
    fn basic_users_verify_and_plain_text_is_refused() -> Result<(), Box<dyn std::error::Error>> {
        let auth = Authenticator::new(&AuthConfig {
            users: vec![user("alice", "s3cret", &["a.>"])],
            jwt: None,
            ..Default::default()
        })?;
        let ok = Credentials::Basic { user: "alice".into(), password: "s3cret".into() };
        let p = auth.authenticate(&ok)?;
        assert!(p.allows(Action::Publish, "a.b") && !p.allows(Action::Publish, "b.c"));
        assert!(auth.verify(&ok, false).is_some(), "remembered once verified: no hash the second time");
        let wrong = Credentials::Basic { user: "alice".into(), password: "nope".into() };
        assert_eq!(auth.authenticate(&wrong), Err(AuthError::BadPassword));
        let unknown = Credentials::Basic { user: "mallory".into(), password: "s3cret".into() };
        assert_eq!(auth.authenticate(&unknown), Err(AuthError::BadPassword));
        assert_eq!(auth.authenticate(&Credentials::Bearer("x".into())), Err(AuthError::NoBearer));

        let plain = UserConfig { password: Some("s3cret".into()), password_hash: None, ..user("bob", "x", &[]) };
        let err = Authenticator::new(&AuthConfig { users: vec![plain], jwt: None, ..Default::default() })
            .err()
            .ok_or("accepted")?;
        assert!(err.to_string().contains("plain-text passwords are refused"), "{err}");
        let junk = UserConfig { password_hash: Some("hunter2".into()), ..user("bob", "x", &[]) };
        assert!(Authenticator::new(&AuthConfig { users: vec![junk], jwt: None, ..Default::default() }).is_err());
        let bcrypt = UserConfig { password_hash: Some(bcrypt::hash("pw", 4)?), ..user("carol", "x", &[">"]) };
        let auth = Authenticator::new(&AuthConfig { users: vec![bcrypt], jwt: None, ..Default::default() })?;
        assert!(auth.authenticate(&Credentials::Basic { user: "carol".into(), password: "pw".into() }).is_ok());
        Ok(())
    }

    #[test]
    fn headers_parse() {
        assert_eq!(
            Credentials::from_header("Basic YWxpY2U6czNjcmV0"),
            Some(Credentials::Basic { user: "alice".into(), password: "s3cret".into() })
        );
        assert_eq!(Credentials::from_header("bearer abc.def"), Some(Credentials::Bearer("abc.def".into())));
        assert_eq!(Credentials::from_header("Basic !!!"), None);
        assert_eq!(Credentials::from_header("Digest x"), None);
        assert_eq!(Credentials::from_header("Bearer "), None);
    }

    fn jwt_config(var: &str) -> JwtConfig {
        std::env::set_var(var, "a secret of at least thirty-two bytes!!");
        JwtConfig {
            algorithm: "HS256".into(),
            secret: Some(SecretSource { file: None, env: Some(var.into()) }),
            leeway_secs: Some(0),
            ..Default::default()
        }
    }

    fn cookie_config(cookie: Option<&str>, origins: &[&str], jwt: bool) -> AuthConfig {
        AuthConfig {
            jwt: jwt.then(|| jwt_config("HERALD_TEST_JWT_COOKIE")),
            cookie: cookie.map(str::to_owned),
            allowed_origins: origins.iter().map(|o| o.to_string()).collect(),
            ..Default::default()
        }
    }

    fn refused(config: &AuthConfig) -> String {
        Authenticator::new(config).err().map(|e| e.to_string()).unwrap_or_else(|| "accepted".into())
    }

    #[test]
    fn cookie_settings_are_checked_at_start() {
        let ok = cookie_config(Some("herald_token"), &["https://app.example.com"], true);
        assert!(Authenticator::new(&ok).is_ok());
        let err = refused(&cookie_config(Some("herald_token"), &[], true));
        assert!(err.contains("auth.cookie is set but auth.allowed_origins is empty"), "{err}");
        let err = refused(&cookie_config(Some("herald_token"), &["https://app.example.com"], false));
        assert!(err.contains("auth.cookie needs [auth.jwt]"), "{err}");
        for bad in ["", "herald token", "a=b", "a;b", "tok\u{e9}n"] {
            let err = refused(&cookie_config(Some(bad), &["https://app.example.com"], true));
            assert!(err.contains("is not a cookie name"), "{bad:?}: {err}");
        }
        let err = refused(&cookie_config(None, &["https://app.example.com"], true));
        assert!(err.contains("auth.allowed_origins is set without auth.cookie"), "{err}");
        let err = refused(&cookie_config(Some("herald_token"), &["https://app.example.com/"], true));
        assert!(err.contains(r#"auth.allowed_origins "https://app.example.com/": an origin is"#), "{err}");
    }

    #[test]
    fn origins_parse_as_browsers_write_them() {
        let parsed = |o: &str| parse_origin(o).map_err(|e| format!("{o}: {e}"));
        assert_eq!(parsed("https://app.example.com"), Ok("https://app.example.com".into()));
        assert_eq!(parsed("HTTPS://App.Example.COM:443"), Ok("https://app.example.com".into()));
        assert_eq!(parsed("http://localhost:8080"), Ok("http://localhost:8080".into()));
        assert_eq!(parsed("http://127.0.0.1:80"), Ok("http://127.0.0.1".into()));
        assert_eq!(parsed("http://[::1]:3000"), Ok("http://[::1]:3000".into()));
        assert_eq!(parsed("https://xn--bcher-kva.example"), Ok("https://xn--bcher-kva.example".into()));
        for bad in [
            "app.example.com",
            "https://app.example.com/",
            "https://app.example.com/app",
            "https://app.example.com?x",
            "https://user@app.example.com",
            "https://*.example.com",
            "*",
            "null",
            "ftp://app.example.com",
            "https://",
            "https://app.example.com:0",
            "https://app.example.com:65536",
            "https://app.example.com:x",
            "https://app example.com",
            "https://[::1",
            "https://[zz]",
            "https://[::1]x",
        ] {
            assert!(parse_origin(bad).is_err(), "{bad} accepted");
        }
    }

    #[test]
    fn a_cookie_token_is_checked_as_a_bearer_token_from_allowed_origins() -> Result<(), Box<dyn std::error::Error>> {
        use jsonwebtoken::{encode, EncodingKey, Header};
        let config = cookie_config(Some("herald_token"), &["https://app.example.com"], true);
        let auth = Authenticator::new(&config)?;
        assert_eq!(auth.cookie(), Some("herald_token"));
        assert!(auth.allows_origin("https://app.example.com") && !auth.allows_origin("https://evil.example"));
        let claims = serde_json::json!({"sub": "carol", "exp": now_secs() + 600, "herald": {"subscribe": [">"]}});
        let key = EncodingKey::from_secret(b"a secret of at least thirty-two bytes!!");
        let token = encode(&Header::new(jsonwebtoken::Algorithm::HS256), &claims, &key)?;
        let cookie =
            |origin: Option<&str>| Credentials::Cookie { token: token.clone(), origin: origin.map(Into::into) };
        assert_eq!(&*auth.authenticate(&cookie(Some("https://app.example.com")))?.name, "carol");
        assert_eq!(&*auth.authenticate(&cookie(None))?.name, "carol", "an SSE request may come without Origin");
        assert_eq!(
            auth.authenticate(&cookie(Some("https://evil.example"))),
            Err(AuthError::Origin("https://evil.example".into()))
        );
        let forged = Credentials::Cookie { token: format!("{token}x"), origin: None };
        assert!(matches!(auth.authenticate(&forged), Err(AuthError::BadToken(_))));
        // A configuration without the cookie (after a reload) refuses it.
        let without = Authenticator::new(&cookie_config(None, &[], true))?;
        assert_eq!(without.authenticate(&cookie(None)), Err(AuthError::NoCookie));
        Ok(())
    }
}
