//! TLS on the one listener: rustls (ring), ALPN `h2` and `http/1.1`, so HTTP/1.1,
//! WebSocket, SSE and HTTP/2 + gRPC share one port as they do without TLS.
//!
//! The certificate is replaced without a restart: the files are checked every
//! [`WATCH_EVERY`] (modification time and size) and on SIGHUP; a changed pair is loaded,
//! checked (the key must match the certificate) and served to every new handshake, while
//! connections already open keep the session they have. A pair that fails to load (a
//! half-written file, a key that does not match) is refused with an error in the log and
//! the current certificate stays.
//!
//! Handshakes run on tasks of their own, at most [`MAX_HANDSHAKES`] at once, each
//! bounded by a timeout, so a client that opens a socket and never finishes its
//! handshake holds nothing for long and never delays another client's.

use std::fmt;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::{Arc, RwLock};
use std::time::Duration;

use anyhow::{bail, Context};
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use rustls::server::{ClientHello, ResolvesServerCert};
use rustls::sign::CertifiedKey;
use rustls::ServerConfig;
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{mpsc, Semaphore};
use tokio_rustls::server::TlsStream;
use tokio_rustls::TlsAcceptor;
use tokio_util::sync::CancellationToken;

/// How often the certificate and key files are checked for a change.
pub const WATCH_EVERY: Duration = Duration::from_secs(1);
/// Handshakes in progress at once; past it, new connections wait in the kernel's backlog.
pub const MAX_HANDSHAKES: usize = 1024;

/// Where the certificate chain and its private key are (PEM files).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TlsFiles {
    /// The certificate chain, leaf first.
    pub cert: PathBuf,
    /// The private key (PKCS#8, PKCS#1 or SEC1).
    pub key: PathBuf,
}

/// The server's TLS configuration and its current certificate.
pub struct Tls {
    files: TlsFiles,
    resolver: Arc<Resolver>,
    config: Arc<ServerConfig>,
}

/// Hands every handshake the current certificate.
struct Resolver {
    current: RwLock<Arc<CertifiedKey>>,
}

impl fmt::Debug for Resolver {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("Resolver")
    }
}

impl ResolvesServerCert for Resolver {
    fn resolve(&self, _hello: ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        Some(self.current.read().unwrap_or_else(|e| e.into_inner()).clone())
    }
}

fn provider() -> Arc<rustls::crypto::CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

/// Loads and checks a certificate chain and its key.
fn load(files: &TlsFiles) -> anyhow::Result<Arc<CertifiedKey>> {
    let chain = CertificateDer::pem_file_iter(&files.cert)
        .and_then(|certs| certs.collect::<Result<Vec<_>, _>>())
        .with_context(|| format!("reading the certificate chain {}", files.cert.display()))?;
    if chain.is_empty() {
        bail!("no certificate in {}", files.cert.display());
    }
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
    Ok(Arc::new(certified))
}

impl Tls {
    /// Loads the pair (a start with a bad pair fails, naming the file).
    pub fn new(files: TlsFiles) -> anyhow::Result<Self> {
        let resolver = Arc::new(Resolver { current: RwLock::new(load(&files)?) });
        let mut config = ServerConfig::builder_with_provider(provider())
            .with_safe_default_protocol_versions()
            .context("TLS protocol versions")?
            .with_no_client_auth()
            .with_cert_resolver(resolver.clone());
        config.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
        Ok(Self { files, resolver, config: Arc::new(config) })
    }

    /// Loads the pair again; on success new handshakes get it, on failure nothing changes.
    pub fn reload(&self) -> anyhow::Result<()> {
        let certified = load(&self.files)?;
        *self.resolver.current.write().unwrap_or_else(|e| e.into_inner()) = certified;
        Ok(())
    }

    /// Reloads when the files change or on SIGHUP, until `shutdown`.
    pub async fn watch(self: Arc<Self>, shutdown: CancellationToken) {
        let stamp = |path: &Path| std::fs::metadata(path).ok().map(|m| (m.modified().ok(), m.len()));
        let stamps = |files: &TlsFiles| (stamp(&files.cert), stamp(&files.key));
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

/// Accepts TCP connections and completes their TLS handshakes on tasks of their own;
/// yields finished streams to `axum::serve`.
pub struct TlsListener {
    ready: mpsc::Receiver<(TlsStream<TcpStream>, SocketAddr)>,
    local: SocketAddr,
    accepting: tokio::task::JoinHandle<()>,
}

impl TlsListener {
    /// Serves TLS with `tls` on `listener`; a handshake not done within `timeout` is dropped.
    pub fn new(listener: TcpListener, tls: &Tls, timeout: Duration) -> std::io::Result<Self> {
        let local = listener.local_addr()?;
        let (tx, ready) = mpsc::channel(64);
        let acceptor = TlsAcceptor::from(tls.config.clone());
        let accepting = tokio::spawn(accept(listener, acceptor, timeout, tx));
        Ok(Self { ready, local, accepting })
    }
}

impl Drop for TlsListener {
    fn drop(&mut self) {
        self.accepting.abort();
    }
}

async fn accept(
    listener: TcpListener,
    acceptor: TlsAcceptor,
    timeout: Duration,
    tx: mpsc::Sender<(TlsStream<TcpStream>, SocketAddr)>,
) {
    let handshakes = Arc::new(Semaphore::new(MAX_HANDSHAKES));
    loop {
        let Ok(permit) = handshakes.clone().acquire_owned().await else { return };
        let (tcp, peer) = match listener.accept().await {
            Ok(accepted) => accepted,
            Err(e) => {
                // Out of file descriptors, say: back off instead of spinning.
                tracing::warn!(error = %e, "accept failed");
                tokio::time::sleep(Duration::from_millis(50)).await;
                continue;
            }
        };
        // Small frames (replies, acks) must not wait for Nagle's algorithm.
        if let Err(e) = tcp.set_nodelay(true) {
            tracing::debug!(error = %e, "could not set TCP_NODELAY");
        }
        let (acceptor, tx) = (acceptor.clone(), tx.clone());
        tokio::spawn(async move {
            match tokio::time::timeout(timeout, acceptor.accept(tcp)).await {
                Ok(Ok(stream)) => {
                    drop(permit);
                    let _ = tx.send((stream, peer)).await;
                }
                Ok(Err(e)) => tracing::debug!(%peer, error = %e, "TLS handshake failed"),
                Err(_) => tracing::debug!(%peer, "TLS handshake timed out"),
            }
        });
    }
}

impl axum::serve::Listener for TlsListener {
    type Io = TlsStream<TcpStream>;
    type Addr = SocketAddr;

    async fn accept(&mut self) -> (Self::Io, Self::Addr) {
        match self.ready.recv().await {
            Some(accepted) => accepted,
            // The accepting task ended (its listener failed for good): accept nothing more.
            None => std::future::pending().await,
        }
    }

    fn local_addr(&self) -> std::io::Result<Self::Addr> {
        Ok(self.local)
    }
}
