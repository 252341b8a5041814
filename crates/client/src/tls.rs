//! How the client checks a server's certificate for `https://`, `wss://` and gRPC over
//! TLS: rustls (ring), trusting either the system's certificate store (the default) or
//! only the CAs of one PEM file (`--ca FILE`, for a private CA, as curl's `--cacert`),
//! and optionally presenting a client certificate (`--cert`/`--key`). A [`TlsConfig`]
//! builds its rustls configuration once; every connection made with it (and its clones)
//! shares it, TLS session cache included.

use std::path::Path;
use std::sync::{Arc, OnceLock};

use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use rustls::{ClientConfig, RootCertStore};

use crate::ClientError;

/// Makes ring the process's default rustls crypto provider, unless one is installed
/// already. reqwest is built here without a provider of its own ("rustls-no-provider",
/// sparing a second crypto library) and needs one to build any client, even for plain
/// `http://`: [`crate::Client`] calls this itself; a program that builds reqwest
/// clients directly calls it first.
pub fn install_crypto_provider() {
    // An error only says a provider is installed already, which is all we need.
    let _ = rustls::crypto::ring::default_provider().install_default();
}

/// Which certificate authorities the client trusts. Cheap to clone.
#[derive(Clone)]
pub struct TlsConfig {
    roots: Arc<RootCertStore>,
    /// The CA file's PEM, when one was given (tonic takes it as PEM).
    ca_pem: Option<Arc<Vec<u8>>>,
    /// A client certificate to log in with (`with_client_cert`).
    identity: Option<Arc<Identity>>,
    /// The HTTP/1.1 configuration (REST, WebSocket), built once and shared by every
    /// connection made with this value, so they share its TLS session cache.
    http1: Arc<OnceLock<Arc<ClientConfig>>>,
}

/// A client certificate chain and its key, parsed (for rustls) and as PEM (for tonic).
struct Identity {
    chain: Vec<CertificateDer<'static>>,
    key: PrivateKeyDer<'static>,
    cert_pem: Vec<u8>,
    key_pem: Vec<u8>,
}

impl std::fmt::Debug for TlsConfig {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TlsConfig")
            .field("roots", &self.roots.len())
            .field("private_ca", &self.ca_pem.is_some())
            .field("client_cert", &self.identity.is_some())
            .finish()
    }
}

impl TlsConfig {
    /// The system's certificate store (read once per process; certificates it cannot
    /// parse are skipped).
    pub fn system() -> Self {
        static SYSTEM: OnceLock<TlsConfig> = OnceLock::new();
        SYSTEM
            .get_or_init(|| {
                let found = rustls_native_certs::load_native_certs();
                for e in &found.errors {
                    tracing::debug!(error = %e, "skipping a system certificate");
                }
                let mut roots = RootCertStore::empty();
                let (added, ignored) = roots.add_parsable_certificates(found.certs);
                tracing::debug!(added, ignored, "system certificate store read");
                TlsConfig { roots: Arc::new(roots), ca_pem: None, identity: None, http1: Arc::default() }
            })
            .clone()
    }

    /// Trusts only the CA certificates in the PEM file at `path`.
    pub fn with_ca_file(path: impl AsRef<Path>) -> Result<Self, ClientError> {
        let path = path.as_ref();
        let pem = std::fs::read(path).map_err(|e| ClientError::Tls(format!("reading {}: {e}", path.display())))?;
        let certs = CertificateDer::pem_slice_iter(&pem)
            .collect::<Result<Vec<_>, _>>()
            .map_err(|e| ClientError::Tls(format!("{}: {e}", path.display())))?;
        if certs.is_empty() {
            return Err(ClientError::Tls(format!("no certificate in {}", path.display())));
        }
        let mut roots = RootCertStore::empty();
        for cert in certs {
            roots.add(cert).map_err(|e| ClientError::Tls(format!("{}: {e}", path.display())))?;
        }
        Ok(TlsConfig { roots: Arc::new(roots), ca_pem: Some(Arc::new(pem)), identity: None, http1: Arc::default() })
    }

    /// A rustls configuration offering `alpn`.
    /// The same trust, presenting the client certificate chain `cert` (PEM, leaf first)
    /// with its private `key` (PEM) to servers that ask for one (a server with
    /// `tls.client_ca` logs the client in as the certificate's Common Name).
    pub fn with_client_cert(mut self, cert: impl AsRef<Path>, key: impl AsRef<Path>) -> Result<Self, ClientError> {
        let (cert, key) = (cert.as_ref(), key.as_ref());
        let read =
            |path: &Path| std::fs::read(path).map_err(|e| ClientError::Tls(format!("reading {}: {e}", path.display())));
        let (cert_pem, key_pem) = (read(cert)?, read(key)?);
        let chain = CertificateDer::pem_slice_iter(&cert_pem)
            .collect::<Result<Vec<_>, _>>()
            .map_err(|e| ClientError::Tls(format!("{}: {e}", cert.display())))?;
        if chain.is_empty() {
            return Err(ClientError::Tls(format!("no certificate in {}", cert.display())));
        }
        let parsed =
            PrivateKeyDer::from_pem_slice(&key_pem).map_err(|e| ClientError::Tls(format!("{}: {e}", key.display())))?;
        let identity = Identity { chain, key: parsed, cert_pem, key_pem };
        // Checked once here, so building a configuration with it cannot fail later.
        Self::builder()
            .with_root_certificates(self.roots.clone())
            .with_client_auth_cert(identity.chain.clone(), identity.key.clone_key())
            .map_err(|e| ClientError::Tls(format!("{} and {}: {e}", cert.display(), key.display())))?;
        self.identity = Some(Arc::new(identity));
        self.http1 = Arc::default();
        Ok(self)
    }

    fn builder() -> rustls::ConfigBuilder<ClientConfig, rustls::WantsVerifier> {
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        // Fails only for a provider without the default protocol versions' cipher
        // suites; ring's default provider has them all.
        #[allow(clippy::expect_used)]
        ClientConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()
            .expect("ring's default provider supports TLS 1.2 and 1.3")
    }

    /// The configuration of HTTP/1.1 connections (REST, WebSocket): built once, shared.
    pub(crate) fn http1(&self) -> Arc<ClientConfig> {
        self.http1.get_or_init(|| Arc::new(self.rustls(&[b"http/1.1"]))).clone()
    }

    fn rustls(&self, alpn: &[&[u8]]) -> ClientConfig {
        let builder = Self::builder().with_root_certificates(self.roots.clone());
        let mut config = match &self.identity {
            // Checked by `with_client_cert`, so this does not fail; if it did, the client
            // would go on without its certificate and the server would say 401.
            Some(id) => builder
                .clone()
                .with_client_auth_cert(id.chain.clone(), id.key.clone_key())
                .unwrap_or_else(|_| builder.with_no_client_auth()),
            None => builder.with_no_client_auth(),
        };
        config.alpn_protocols = alpn.iter().map(|p| p.to_vec()).collect();
        config
    }

    /// tonic's form of the same trust, for gRPC over TLS (ALPN h2).
    pub(crate) fn tonic(&self) -> tonic::transport::ClientTlsConfig {
        let mut config = tonic::transport::ClientTlsConfig::new();
        if let Some(id) = &self.identity {
            config = config.identity(tonic::transport::Identity::from_pem(&id.cert_pem, &id.key_pem));
        }
        match &self.ca_pem {
            Some(pem) => config.ca_certificate(tonic::transport::Certificate::from_pem(pem.as_slice())),
            None => config.with_native_roots(),
        }
    }
}
