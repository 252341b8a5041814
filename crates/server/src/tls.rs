//! TLS on the one listener: rustls (ring), ALPN `h2` and `http/1.1`, so HTTP/1.1,
//! WebSocket, SSE and HTTP/2 + gRPC share one port as they do without TLS.
//!
//! With `client_ca`, clients may present a certificate signed by it (verified in the
//! handshake); its subject's Common Name is the client's user name ([`client_user`]).
//!
//! The certificate (and the client CA) is replaced without a restart: the files are checked every
//! [`WATCH_EVERY`] (modification time and size) and on SIGHUP; a changed pair is loaded,
//! checked (the key must match the certificate) and served to every new handshake, while
//! connections already open keep the session they have. A pair that fails to load (a
//! half-written file, a key that does not match) is refused with an error in the log and
//! the current certificate stays.
//!
//! Handshakes are the listener's business (`crate::listen`): each on the connection's
//! own task, bounded by `timeouts.handshake_timeout`.

use std::path::{Path, PathBuf};
use std::sync::{Arc, RwLock};
use std::time::Duration;

use anyhow::{bail, Context};
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use rustls::server::WebPkiClientVerifier;
use rustls::sign::{CertifiedKey, SingleCertAndKey};
use rustls::{RootCertStore, ServerConfig};
use tokio_rustls::TlsAcceptor;
use tokio_util::sync::CancellationToken;

/// How often the certificate and key files are checked for a change.
pub const WATCH_EVERY: Duration = Duration::from_secs(1);

/// Where the certificate chain and its private key are (PEM files).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TlsFiles {
    /// The certificate chain, leaf first.
    pub cert: PathBuf,
    /// The private key (PKCS#8, PKCS#1 or SEC1).
    pub key: PathBuf,
    /// CA certificates (PEM) that sign client certificates: with it, the server asks
    /// each client for a certificate (optional) and verifies one that is presented; its
    /// subject's Common Name is the client's user name.
    pub client_ca: Option<PathBuf>,
}

/// The server's TLS configuration: its files, and the configuration built from them,
/// replaced as a whole when they change.
pub struct Tls {
    files: TlsFiles,
    config: RwLock<Arc<ServerConfig>>,
}

fn provider() -> Arc<rustls::crypto::CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

/// The certificates of a PEM file (at least one); `what` names the file in errors.
fn certificates(path: &Path, what: &str) -> anyhow::Result<Vec<CertificateDer<'static>>> {
    let certs = CertificateDer::pem_file_iter(path)
        .and_then(|certs| certs.collect::<Result<Vec<_>, _>>())
        .with_context(|| format!("reading {what} {}", path.display()))?;
    if certs.is_empty() {
        bail!("no certificate in {}", path.display());
    }
    Ok(certs)
}

/// Loads and checks a certificate chain and its key.
fn load(files: &TlsFiles) -> anyhow::Result<CertifiedKey> {
    let chain = certificates(&files.cert, "the certificate chain")?;
    let key = PrivateKeyDer::from_pem_file(&files.key)
        .with_context(|| format!("reading the private key {}", files.key.display()))?;
    let signing = provider()
        .key_provider
        .load_private_key(key)
        .with_context(|| format!("the private key {} is not usable", files.key.display()))?;
    let certified = CertifiedKey::new(chain, signing);
    certified.keys_match().with_context(|| {
        format!("the private key {} does not match the certificate {}", files.key.display(), files.cert.display())
    })?;
    Ok(certified)
}

/// The server configuration of `files`: the certificate pair, loaded and checked; ALPN;
/// and client certificates verified against `client_ca` when set.
fn server_config(files: &TlsFiles) -> anyhow::Result<Arc<ServerConfig>> {
    let certified = load(files)?;
    let builder = ServerConfig::builder_with_provider(provider())
        .with_safe_default_protocol_versions()
        .context("TLS protocol versions")?;
    let builder = match &files.client_ca {
        None => builder.with_no_client_auth(),
        Some(path) => {
            let mut roots = RootCertStore::empty();
            for cert in certificates(path, "the client CA")? {
                roots.add(cert).with_context(|| format!("a certificate of the client CA {}", path.display()))?;
            }
            // Optional: a client without a certificate goes on to other credentials.
            let verifier = WebPkiClientVerifier::builder_with_provider(Arc::new(roots), provider())
                .allow_unauthenticated()
                .build()
                .with_context(|| format!("the client CA {}", path.display()))?;
            builder.with_client_cert_verifier(verifier)
        }
    };
    let mut config = builder.with_cert_resolver(Arc::new(SingleCertAndKey::from(certified)));
    config.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
    Ok(Arc::new(config))
}

/// The user name of a connection's verified client certificate: its subject's Common
/// Name (`None` without a certificate, or without a readable Common Name).
pub fn client_user(connection: &rustls::ServerConnection) -> Option<Arc<str>> {
    let leaf = connection.peer_certificates()?.first()?;
    let (_, cert) = x509_parser::parse_x509_certificate(leaf.as_ref()).ok()?;
    let name = cert.subject().iter_common_name().next()?.as_str().ok()?;
    Some(Arc::from(name))
}

impl Tls {
    /// Loads the pair and the client CA (a start with a bad file fails, naming it).
    pub fn new(files: TlsFiles) -> anyhow::Result<Self> {
        let config = server_config(&files)?;
        Ok(Self { files, config: RwLock::new(config) })
    }

    /// What completes handshakes with the current certificate and client CA.
    pub fn acceptor(&self) -> TlsAcceptor {
        TlsAcceptor::from(self.config.read().unwrap_or_else(|e| e.into_inner()).clone())
    }

    /// Loads the pair and the client CA again; on success new handshakes get them, on
    /// failure nothing changes.
    pub fn reload(&self) -> anyhow::Result<()> {
        let config = server_config(&self.files)?;
        *self.config.write().unwrap_or_else(|e| e.into_inner()) = config;
        Ok(())
    }

    /// Reloads when the files change or on SIGHUP, until `shutdown`.
    pub async fn watch(self: Arc<Self>, shutdown: CancellationToken) {
        let stamp = |path: &Path| std::fs::metadata(path).ok().map(|m| (m.modified().ok(), m.len()));
        let stamps = |files: &TlsFiles| (stamp(&files.cert), stamp(&files.key), files.client_ca.as_deref().map(stamp));
        let mut seen = stamps(&self.files);
        let mut hangup = match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::hangup()) {
            Ok(s) => Some(s),
            Err(e) => {
                tracing::warn!(error = %e, "cannot listen for SIGHUP; certificate files are still watched");
                None
            }
        };
        let mut tick = tokio::time::interval(WATCH_EVERY);
        loop {
            let signalled = async {
                match &mut hangup {
                    Some(h) => h.recv().await,
                    None => std::future::pending().await,
                }
            };
            let why = tokio::select! {
                _ = shutdown.cancelled() => return,
                _ = signalled => "SIGHUP",
                _ = tick.tick() => {
                    let now = stamps(&self.files);
                    if now == seen {
                        continue;
                    }
                    seen = now;
                    "the files changed"
                }
            };
            match self.reload() {
                Ok(()) => tracing::info!(cert = %self.files.cert.display(), why, "TLS certificate reloaded"),
                Err(e) => {
                    tracing::error!(error = %format!("{e:#}"), why, "TLS certificate not reloaded; serving the previous one")
                }
            }
        }
    }
}
