//! The store's settings ([`PgConfig`]), its start-up errors ([`PgError`]), and what is
//! derived from them before any connection: the checked schema name, the URL with its
//! password hidden, the `tokio_postgres` connection settings (statement timeout,
//! keepalives, TLS mode) and the rustls connector. Called by `PgStore::connect`; knows
//! nothing of topics or queues.

use std::fmt;
use std::str::FromStr;
use std::sync::Arc;
use std::time::Duration;

use herald_core::RetentionConfig;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::CertificateDer;
use tokio_postgres::config::SslMode;

/// How long one connection attempt (TCP, TLS and the start-up exchange) may take.
pub(crate) const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);

/// Longest schema name PostgreSQL keeps whole (NAMEDATALEN - 1).
const MAX_SCHEMA_LEN: usize = 63;

/// Settings of the PostgreSQL store.
#[derive(Clone, PartialEq, Eq)]
pub struct PgConfig {
    /// The server, as `postgres://user[:password]@host[:port]/database[?sslmode=...]` or
    /// as `key=value` pairs (default `postgres://postgres@127.0.0.1:5432/herald`).
    /// TLS is used only with `sslmode=require`, `verify-ca` or `verify-full`, and the
    /// server's certificate and name are then always verified (rustls has no unverified
    /// mode: `require` behaves as `verify-full`), against the PEM file `sslrootcert=`
    /// names if given, else the system's trust roots.
    pub url: String,
    /// The schema every table lives in (default `herald`), so that several deployments
    /// share one database: 1 to 63 lowercase ASCII letters, digits and underscores, not
    /// starting with `pg_`.
    pub schema: String,
    /// Connections in the pool (default 16): the append writers take two, the queue
    /// writer one, reads, heads and the sweep share the rest; at least 4.
    pub pool_size: usize,
    /// Longest any statement may run (default 10 s), set on every pooled connection, so
    /// that a stuck query holds neither a connection nor its locks for longer.
    pub statement_timeout: Duration,
    /// Topic retention: by count and age, and per-message TTL.
    pub retention: RetentionConfig,
    /// The password, when the URL has none (read from a file or `PGPASSWORD` by the
    /// server); never shown.
    pub password: Option<String>,
}

impl Default for PgConfig {
    fn default() -> Self {
        Self {
            url: "postgres://postgres@127.0.0.1:5432/herald".to_owned(),
            schema: "herald".to_owned(),
            pool_size: 16,
            statement_timeout: Duration::from_secs(10),
            retention: RetentionConfig::default(),
            password: None,
        }
    }
}

impl PgConfig {
    /// The URL with its password (in the user part or a `password=` parameter) replaced
    /// by `***`: what logs and errors show.
    pub fn redacted_url(&self) -> String {
        redact(&self.url)
    }
}

impl fmt::Debug for PgConfig {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("PgConfig")
            .field("url", &self.redacted_url())
            .field("schema", &self.schema)
            .field("pool_size", &self.pool_size)
            .field("statement_timeout", &self.statement_timeout)
            .field("retention", &self.retention)
            .field("password", &self.password.as_ref().map(|_| "***"))
            .finish()
    }
}

impl fmt::Display for PgConfig {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{} (schema {})", self.redacted_url(), self.schema)
    }
}

/// Why [`crate::PgStore::connect`] failed. No variant holds the URL's password.
#[derive(Debug, thiserror::Error)]
pub enum PgError {
    /// The schema name is not one the store accepts.
    #[error(
        "invalid PostgreSQL schema name {0:?}: use 1 to 63 lowercase ASCII letters, digits and underscores, not starting with pg_"
    )]
    Schema(String),
    /// The URL could not be parsed (the message names the option, never its value).
    #[error("invalid PostgreSQL URL {url}: {reason}")]
    Url {
        /// The URL, redacted.
        url: String,
        /// What is wrong with it.
        reason: String,
    },
    /// A setting is out of range.
    #[error("invalid PostgreSQL store setting: {0}")]
    Setting(String),
    /// The TLS configuration could not be built.
    #[error("PostgreSQL TLS: {0}")]
    Tls(String),
    /// The server could not be reached or refused the connection.
    #[error("PostgreSQL at {url} is unavailable: {reason}")]
    Unavailable {
        /// The URL, redacted.
        url: String,
        /// Why.
        reason: String,
    },
    /// A statement failed while starting (migrations, loading queue records).
    #[error("PostgreSQL: {0}")]
    Database(String),
    /// The schema was migrated by a newer Herald than this one.
    #[error(
        "the PostgreSQL schema {schema} is at migration version {database}, newer than the {binary} this binary knows: run a Herald at least as new, or use another schema"
    )]
    NewerDatabase {
        /// The schema.
        schema: String,
        /// The highest version applied in the database.
        database: i32,
        /// The highest version this binary knows.
        binary: i32,
    },
    /// A stored row could not be decoded.
    #[error("damaged row in PostgreSQL: {0}")]
    Damaged(String),
}

/// Checks a schema name: `[a-z0-9_]{1,63}`, not `pg_*` (reserved by PostgreSQL).
pub fn validate_schema(name: &str) -> Result<(), PgError> {
    let ok = !name.is_empty()
        && name.len() <= MAX_SCHEMA_LEN
        && name.bytes().all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'_')
        && !name.starts_with("pg_");
    if ok {
        Ok(())
    } else {
        Err(PgError::Schema(name.to_owned()))
    }
}

/// Hides the password of a URL (`scheme://user:password@host...`, or a `password`
/// parameter in the query or in `key=value` form).
pub(crate) fn redact(url: &str) -> String {
    let (head, rest) = match url.find("://") {
        Some(i) => url.split_at(i + 3),
        None => return redact_pairs(url, ' '),
    };
    // The user part ends at an '@': the last one before the query, or (a password
    // holding an unencoded '?') the last one at all. Erring towards hiding more.
    let at = match rest.find('?') {
        Some(q) if rest[..q].contains('@') => rest[..q].rfind('@'),
        _ => rest.rfind('@'),
    };
    let (user, tail) = match at {
        Some(at) => match rest[..at].find(':') {
            Some(colon) => (format!("{}:***", &rest[..colon]), &rest[at..]),
            None => (String::new(), rest),
        },
        None => (String::new(), rest),
    };
    let tail = match tail.split_once('?') {
        Some((path, query)) => format!("{path}?{}", redact_pairs(query, '&')),
        None => tail.to_owned(),
    };
    format!("{head}{user}{tail}")
}

/// `password=...` in pairs separated by `sep` becomes `password=***`.
fn redact_pairs(pairs: &str, sep: char) -> String {
    let mut kept: Vec<String> = Vec::new();
    // In key=value form a quoted password may hold the separator: hide up to the
    // closing quote.
    let mut hiding = false;
    for part in pairs.split(sep) {
        if hiding {
            hiding = !part.ends_with('\'');
            continue;
        }
        match part.split_once('=') {
            Some((key, value)) if key.trim() == "password" => {
                kept.push(format!("{key}=***"));
                hiding = sep == ' ' && value.starts_with('\'') && (value.len() == 1 || !value.ends_with('\''));
            }
            _ => kept.push(part.to_owned()),
        }
    }
    kept.join(&sep.to_string())
}

/// Whether connections use TLS.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum Tls {
    /// Plain TCP (no `sslmode`, or `disable`, `allow`, `prefer`).
    Off,
    /// TLS with the certificate verified (`require`, `verify-ca`, `verify-full`) against
    /// the PEM certificates of `sslrootcert` if given, else the system's trust roots.
    Verified {
        /// The `sslrootcert` file.
        roots: Option<String>,
    },
}

/// The URL without `sslmode` and `sslrootcert` (tokio-postgres knows neither the
/// `verify-*` modes nor `sslrootcert`), and the TLS they asked for.
fn take_tls(url: &str) -> Result<(String, Tls), String> {
    let (base, sep, pairs) = match url.find("://") {
        Some(_) => match url.split_once('?') {
            Some((base, query)) => (format!("{base}?"), '&', query),
            None => return Ok((url.to_owned(), Tls::Off)),
        },
        None => (String::new(), ' ', url),
    };
    let (mut verified, mut roots) = (false, None);
    let mut kept = Vec::new();
    for part in pairs.split(sep) {
        match part.split_once('=') {
            Some((key, value)) if key.trim() == "sslmode" => {
                verified = match value.trim() {
                    "disable" | "allow" | "prefer" => false,
                    "require" | "verify-ca" | "verify-full" => true,
                    _ => return Err("sslmode must be disable, allow, prefer, require, verify-ca or verify-full".into()),
                }
            }
            Some((key, value)) if key.trim() == "sslrootcert" => roots = Some(value.trim().to_owned()),
            _ => kept.push(part),
        }
    }
    let joined = kept.join(&sep.to_string());
    let url = if base.is_empty() {
        joined
    } else if joined.is_empty() {
        base.trim_end_matches('?').to_owned()
    } else {
        format!("{base}{joined}")
    };
    Ok((url, if verified { Tls::Verified { roots } } else { Tls::Off }))
}

/// The connection settings for the pool: the URL's, plus the statement timeout (and the
/// same bound on idle transactions), keepalives that notice a vanished server within
/// about 30 s, a connect timeout and an application name.
pub(crate) fn connection_config(config: &PgConfig) -> Result<(tokio_postgres::Config, Tls), PgError> {
    let bad = |reason: String| PgError::Url { url: config.redacted_url(), reason };
    let (url, tls) = take_tls(&config.url).map_err(bad)?;
    let mut pg = tokio_postgres::Config::from_str(&url).map_err(|e| bad(e.to_string()))?;
    if let (None, Some(password)) = (pg.get_password(), &config.password) {
        pg.password(password.as_bytes());
    }
    let ms = config.statement_timeout.as_millis();
    if ms == 0 || ms > i32::MAX as u128 {
        return Err(PgError::Setting(format!(
            "statement_timeout must be between 1 ms and {} ms, got {ms} ms",
            i32::MAX
        )));
    }
    let ours = format!("-c statement_timeout={ms} -c idle_in_transaction_session_timeout={ms}");
    let options = match pg.get_options() {
        Some(theirs) if !theirs.is_empty() => format!("{theirs} {ours}"),
        _ => ours,
    };
    pg.options(options);
    if pg.get_application_name().is_none() {
        pg.application_name("herald");
    }
    pg.connect_timeout(CONNECT_TIMEOUT)
        .keepalives(true)
        .keepalives_idle(Duration::from_secs(15))
        .keepalives_interval(Duration::from_secs(5))
        .keepalives_retries(3)
        .ssl_mode(match tls {
            Tls::Off => SslMode::Disable,
            Tls::Verified { .. } => SslMode::Require,
        });
    Ok((pg, tls))
}

/// The rustls connector: the ring provider the tree already uses; as trust roots the
/// certificates of the `roots` PEM file, or else the system's.
pub(crate) fn tls_connector(roots: Option<&str>) -> Result<tokio_postgres_rustls::MakeRustlsConnect, PgError> {
    let mut store = rustls::RootCertStore::empty();
    match roots {
        Some(path) => {
            let unreadable = |e: rustls::pki_types::pem::Error| PgError::Tls(format!("sslrootcert {path}: {e}"));
            for cert in CertificateDer::pem_file_iter(path).map_err(unreadable)? {
                store.add(cert.map_err(unreadable)?).map_err(|e| PgError::Tls(format!("sslrootcert {path}: {e}")))?;
            }
            if store.is_empty() {
                return Err(PgError::Tls(format!("sslrootcert {path} holds no certificate")));
            }
        }
        None => {
            let found = rustls_native_certs::load_native_certs();
            for cert in found.certs {
                // One the system lists but rustls cannot parse is skipped, as curl does.
                let _ = store.add(cert);
            }
            if store.is_empty() {
                let why = found.errors.first().map_or_else(|| "none installed".to_owned(), |e| e.to_string());
                return Err(PgError::Tls(format!("no trusted root certificate could be loaded ({why})")));
            }
        }
    }
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let tls = rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .map_err(|e| PgError::Tls(e.to_string()))?
        .with_root_certificates(store)
        .with_no_client_auth();
    Ok(tokio_postgres_rustls::MakeRustlsConnect::new(tls))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn passwords_are_hidden() {
        assert_eq!(redact("postgres://u:secret@h:5432/db"), "postgres://u:***@h:5432/db");
        assert_eq!(redact("postgres://u:p%40ss@h/db?sslmode=require"), "postgres://u:***@h/db?sslmode=require");
        assert_eq!(redact("postgres://u@h/db?password=secret&x=1"), "postgres://u@h/db?password=***&x=1");
        assert_eq!(redact("postgres://h/db"), "postgres://h/db");
        assert_eq!(redact("postgres://u:p/w@h/db"), "postgres://u:***@h/db");
        assert_eq!(redact("postgres://u:p?w@h/db"), "postgres://u:***@h/db");
        assert_eq!(redact("postgres://u:pw@h/db?x=a@b"), "postgres://u:***@h/db?x=a@b");
        assert_eq!(redact("postgres://h/db?password=se@cret"), "postgres://h/db?password=***");
        assert_eq!(redact("host=h password=secret user=u"), "host=h password=*** user=u");
        assert_eq!(redact("host=h password='a b c' user=u"), "host=h password=*** user=u");
    }

    #[test]
    fn schema_names() {
        for good in ["herald", "h", "herald_2", "_x", &"a".repeat(63)] {
            assert!(validate_schema(good).is_ok(), "{good}");
        }
        for bad in ["", "Herald", "a-b", "a b", "a;drop", "\"x\"", "pg_x", "é", &"a".repeat(64)] {
            assert!(matches!(validate_schema(bad), Err(PgError::Schema(_))), "{bad}");
        }
    }

    #[test]
    fn sslmode_is_ours() -> Result<(), String> {
        let verified = |roots: Option<&str>| Tls::Verified { roots: roots.map(str::to_owned) };
        assert_eq!(take_tls("postgres://h/db")?, ("postgres://h/db".to_owned(), Tls::Off));
        assert_eq!(take_tls("postgres://h/db?sslmode=verify-full")?, ("postgres://h/db".to_owned(), verified(None)));
        assert_eq!(
            take_tls("postgres://h/db?application_name=a&sslmode=require&sslrootcert=/ca.pem")?,
            ("postgres://h/db?application_name=a".to_owned(), verified(Some("/ca.pem")))
        );
        assert_eq!(take_tls("host=h sslmode=prefer sslrootcert=x")?, ("host=h".to_owned(), Tls::Off));
        assert!(take_tls("postgres://h/db?sslmode=maybe").is_err());
        Ok(())
    }

    #[test]
    fn statement_timeout_reaches_the_options() -> Result<(), PgError> {
        let config = PgConfig {
            url: "postgres://u@h/db?options=-c%20search_path%3Dx".to_owned(),
            statement_timeout: Duration::from_millis(1500),
            ..PgConfig::default()
        };
        let (pg, tls) = connection_config(&config)?;
        assert_eq!(tls, Tls::Off);
        assert_eq!(
            pg.get_options(),
            Some("-c search_path=x -c statement_timeout=1500 -c idle_in_transaction_session_timeout=1500")
        );
        Ok(())
    }
}
